"""Summarise documents of any length with a model exported by launchers/train.py.

    python launchers/summarize.py --model outputs/run/exported --input docs.jsonl --output summaries.jsonl

Each input line is a JSON object with a "document" field (--text_column); each output line is
that object with the generated summary added as "prediction" (--output_column), so an input in
the training format keeps its reference "summary" beside it. The CachED windows the model was trained with are read from cached_config.json. On a
GPU by default, in bf16 where it supports it (--device, --dtype).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers as hf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from cached_ds import CachedConfig, CachedSeq2Seq  # noqa: E402
from cached_ds.deepspeed_engine import CACHED_CONFIG_FILE  # noqa: E402
from cached_ds.evaluation import summarize  # noqa: E402


def load_cached_settings(model_dir: Path) -> CachedConfig:
    path = model_dir / CACHED_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: --model must be a folder exported by launchers/train.py")
    settings = json.loads(path.read_text())
    return CachedConfig(**{k: v for k, v in settings.items() if k != "mode"})


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}, column {error.colno})") from None
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder exported by launchers/train.py")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of documents")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--text_column", default="document", help="field holding each document")
    parser.add_argument("--output_column", default="prediction",
                        help="field each output line gets the generated summary in (an input field of that name is refused, not overwritten)")
    parser.add_argument("--num_beams", type=int, default=4, help="beam width")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest summary")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam-search length penalty")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU that supports it, else fp32")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")

    records = read_records(args.input)  # before the model: a bad input fails in a second
    clashing = [i + 1 for i, r in enumerate(records) if args.output_column in r]
    if clashing:
        raise ValueError(f"{args.input}: lines {clashing[:10]} already have a {args.output_column!r} field, which the "
                         "generated summary would overwrite; pass another --output_column")
    hf_model = hf.AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=DTYPES[dtype]).to(device).eval()
    model = CachedSeq2Seq(hf_model, load_cached_settings(args.model))
    tokenizer = hf.AutoTokenizer.from_pretrained(args.model)
    missing = [i + 1 for i, r in enumerate(records) if args.text_column not in r]
    if missing:
        raise ValueError(f"{args.input}: lines {missing[:10]} have no {args.text_column!r} field; set --text_column")
    documents = [tokenizer(r[args.text_column])["input_ids"] for r in records]
    with tqdm(total=len(documents), desc="summarising") as bar:
        summaries = summarize(model, tokenizer, documents, progress=bar, num_beams=args.num_beams,
                              max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as handle:
        for record, summary in zip(records, summaries):
            handle.write(json.dumps({**record, args.output_column: summary}) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad input: one line naming it, no traceback
        sys.exit(f"summarize.py: error: {error}")
