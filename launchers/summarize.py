"""Summarise documents of any length with a model exported by launchers/train.py.

    python launchers/summarize.py --model outputs/run/exported --input docs.jsonl --output summaries.jsonl

Each input line is a JSON object with a "document" field (--text_column); each output line adds
"summary". The CachED windows the model was trained with are read from cached_config.json.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder exported by launchers/train.py")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of documents")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--text_column", default="document", help="field holding each document")
    parser.add_argument("--num_beams", type=int, default=4, help="beam width")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest summary")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam-search length penalty")
    args = parser.parse_args(argv)

    model = CachedSeq2Seq(hf.AutoModelForSeq2SeqLM.from_pretrained(args.model), load_cached_settings(args.model))
    tokenizer = hf.AutoTokenizer.from_pretrained(args.model)
    records = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
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
            handle.write(json.dumps({**record, "summary": summary}) + "\n")


if __name__ == "__main__":
    main()
