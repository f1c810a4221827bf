"""Summarise documents of any length with a model exported by launchers/train.py.

    python launchers/summarize.py --model outputs/run/exported --input docs.jsonl --output summaries.jsonl

Each input line is a JSON object with a "document" field (--text_column); each output line is
that object with the generated summary added as "prediction" (--output_column), so an input in
the training format keeps its reference "summary" beside it. The CachED windows the model was
trained with are read from cached_config.json, the text put before every document (train.py's
--source_prefix) from the model's config. On a GPU by default, in bf16 where it supports it
(--device, --dtype).

Summaries are written as they are made, to <output>.partial, which becomes <output> when every
document is done: an interrupted run keeps its work, and the same command continues it (other
generation settings or another input are refused: <output>.partial.json records them).
"""

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from cached_ds import CachedSeq2Seq  # noqa: E402
from cached_ds.ds_config import native_bf16  # noqa: E402
from cached_ds.evaluation import GENERATION_FLAGS, check_generation_flags, generation_settings, summarize  # noqa: E402
from cached_ds.long_text import token_ids  # noqa: E402
from cached_ds.model_zoo import load_tokenizer  # noqa: E402
from cached_ds.run_outputs import write_atomic  # noqa: E402

logger = logging.getLogger("cached_ds.summarize")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# where neither a flag nor the model's generation_config sets them (train.py's evaluation: 1 beam, 128)
DEFAULTS = {"num_beams": 4, "max_new_tokens": 256, "min_new_tokens": 0, "length_penalty": 1.0}


class JsonLines:
    """The input's JSON lines, read one at a time (a file of books need not fit in memory): one
    pass finds each non-blank line's byte offset and line number. Lines end at "\n" only:
    str.splitlines() also breaks at U+2028 and U+0085, which JSON strings may hold raw."""

    def __init__(self, path: Path):
        self.path, self.offsets, self.numbers = path, [], []
        offset = 0
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.numbers.append(number)
                offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def records(self, start: int = 0):
        """(line number, record) of every line from the ``start``-th."""
        with self.path.open("rb") as handle:
            for offset, number in zip(self.offsets[start:], self.numbers[start:]):
                handle.seek(offset)
                yield number, self._parse(handle.readline(), number)

    def _parse(self, line: bytes, number: int):
        try:
            return json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: line {number} is not valid UTF-8 (byte {line[error.start]:#04x}); re-encode the "
                             "file as UTF-8") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: line {number} is not valid JSON ({error.msg}, column {error.colno})") from None


def check_records(lines: JsonLines, args) -> list[int]:
    """Every line a JSON object with text in --text_column and no --output_column field yet.
    Returns the lines whose text is empty."""
    problems = {
        "are not JSON objects": lambda r: not isinstance(r, dict),
        f"have no {args.text_column!r} field; set --text_column": lambda r: isinstance(r, dict) and args.text_column not in r,
        f"hold no text in {args.text_column!r}":
            lambda r: isinstance(r, dict) and args.text_column in r and not isinstance(r[args.text_column], str),
        f"already have a {args.output_column!r} field, which the generated summary would overwrite; pass another --output_column":
            lambda r: isinstance(r, dict) and args.output_column in r,
    }
    found: dict[str, list[int]] = {problem: [] for problem in problems}
    empty = []
    for number, record in lines.records():
        failed = [problem for problem, test in problems.items() if test(record)]
        for problem in failed:
            found[problem].append(number)
        if not failed and not record[args.text_column].strip():
            empty.append(number)
    for problem, numbers in found.items():
        if numbers:
            raise ValueError(f"{args.input}: lines {numbers[:10]} {problem}")
    return empty


def model_files(folder: Path, sample: int = 1 << 20) -> dict:
    """A fingerprint of the model's weights and configs: an interrupted run is not continued with
    another model saved into the same folder since. Configs hashed whole; weights by size and a
    hash of their first and last MiB (weights of a retrained model differ there; hashing GBs would
    cost seconds), not by modification time, which a copy without -p changes."""
    prints = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name in ("config.json", "generation_config.json")):
            with path.open("rb") as handle:
                size = path.stat().st_size
                head = handle.read(sample if path.suffix in (".safetensors", ".bin") else size)
                handle.seek(max(size - sample, len(head)))
                prints[path.name] = [size, hashlib.blake2b(head + handle.read(), digest_size=16).hexdigest()]
    return prints


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN equals itself here


def settings_file(partial: Path) -> Path:
    """Where the generation settings of ``partial`` are kept, to refuse continuing it under others."""
    return partial.with_name(partial.name + ".json")


def done_before(partial: Path, lines: JsonLines, output_column: str, settings: dict) -> int:
    """How many documents an interrupted run of the same input and settings already wrote to
    ``partial``, read line by line. Read as bytes: the interruption may have cut the last line
    inside a character."""
    sidecar = settings_file(partial)
    if not partial.is_file():
        return 0
    before = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    if not _same(before, settings):
        if before is not None and "model_files" not in before:
            raise ValueError(f"{partial} was written by an earlier version of summarize.py, which recorded less of its settings; "
                             "delete it to start over")
        changed = sorted(k for k in settings if (before or {}).get(k) != settings[k])
        raise ValueError(f"{partial} was written with other settings ({', '.join(changed)}); rerun with the same ones "
                         "to continue it, or delete it to start over")
    done = complete = 0
    records = lines.records()
    with partial.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):  # cut short by the interruption
                break
            row = json.loads(line.decode("utf-8"))
            summary = row.pop(output_column, None)
            _, record = next(records, (None, None))
            if record is None or not _same(row, record) or not isinstance(summary, str):
                raise ValueError(f"{partial} holds summaries of other documents (its line {done + 1} is not this input's); "
                                 "delete it to start over")
            done, complete = done + 1, complete + len(line)
    if complete < partial.stat().st_size:
        with partial.open("r+b") as handle:  # drop the cut line, keep the complete ones
            handle.truncate(complete)
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder exported by launchers/train.py")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file of documents")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--text_column", default="document", help="field holding each document")
    parser.add_argument("--output_column", default="prediction",
                        help="field each output line gets the generated summary in (an input field of that name is refused, not overwritten)")
    model_or = "default: the model's generation_config, else"
    parser.add_argument("--num_beams", type=int, default=None, help=f"beam width ({model_or} 4)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help=f"longest summary ({model_or} 256; capped where learned decoder positions end)")
    parser.add_argument("--min_new_tokens", type=int, default=None, help=f"shortest summary ({model_or} 0)")
    parser.add_argument("--length_penalty", type=float, default=None, help=f"beam-search length penalty ({model_or} 1.0)")
    parser.add_argument("--max_source_tokens", type=int, default=None,
                        help="cut documents to this many tokens, as train.py's flag of that name did for its evaluation (default: whole)")
    parser.add_argument("--source_prefix", default=None,
                        help="text put before every document (default: the one the model was trained with, its config's prefix)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU that computes it natively (Ampere or newer), else fp32")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would summarise every document into the same .partial file
        raise ValueError(f"summarize.py runs as one process, but this launch has WORLD_SIZE={os.environ['WORLD_SIZE']}: run it "
                         "with python, once per GPU on a part of the input if you want several (e.g. CUDA_VISIBLE_DEVICES=1 "
                         "python launchers/summarize.py --input part1.jsonl ...)")
    given = {name: getattr(args, name) for name in GENERATION_FLAGS}
    check_generation_flags(given)  # as train.py's
    if args.max_source_tokens is not None and args.max_source_tokens < 1:
        raise ValueError(f"--max_source_tokens must be at least 1, got {args.max_source_tokens}")
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if not args.model.is_dir():
        raise ValueError(f"--model {args.model}: no such folder; give the folder train.py exported (<output_dir>/exported)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" and native_bf16() else "fp32")

    lines = JsonLines(args.input)  # checked before the model loads: a bad input fails in seconds
    empty = check_records(lines, args)
    partial = args.output.with_name(args.output.name + ".partial")
    generation = {"model": str(args.model.resolve()), "model_files": model_files(args.model), "dtype": dtype, **given,
                  "text_column": args.text_column, "output_column": args.output_column, "source_prefix": args.source_prefix,
                  "max_source_tokens": args.max_source_tokens}
    done = done_before(partial, lines, args.output_column, generation)
    if done:
        logger.info("continuing %s: %d of %d documents were summarised before", partial, done, len(lines))
    # checks cached_config.json before HF's load, whose error would not say which folder to pass
    model = CachedSeq2Seq.from_pretrained(args.model, dtype=DTYPES[dtype]).to(device).eval()
    hf_model = model.model
    tokenizer = load_tokenizer(args.model, fix="give --model the folder train.py exported (<output_dir>/exported)")
    prefix = args.source_prefix if args.source_prefix is not None else (getattr(hf_model.config, "prefix", None) or "")
    if prefix:
        logger.info("documents start with %r (%s)", prefix, "--source_prefix" if args.source_prefix is not None else "the model's prefix")
    settings, notes = generation_settings(hf_model, given, DEFAULTS)
    for level, note in notes:
        logger.log(level, note)
    if empty:
        logger.warning("lines %s have an empty %r: their %r is empty", empty[:10], args.text_column, args.output_column)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sidecar = settings_file(partial)
    write_atomic(sidecar, json.dumps(generation, indent=1) + "\n")  # a cut-short settings file would block continuing
    with partial.open("a", encoding="utf-8") as handle, tqdm(total=len(lines), initial=done, desc="summarising") as bar:
        for _, record in lines.records(done):
            text = record[args.text_column]
            summary = ""
            if text.strip():
                [summary] = summarize(model, tokenizer, [token_ids(tokenizer, prefix + text, args.max_source_tokens)], **settings)
            handle.write(json.dumps({**record, args.output_column: summary}, ensure_ascii=False) + "\n")
            handle.flush()
            bar.update(1)
        os.fsync(handle.fileno())
    os.replace(partial, args.output)
    sidecar.unlink()


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad input: one line naming it, no traceback
        sys.exit(f"summarize.py: error: {error}")
