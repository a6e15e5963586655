"""`medclip app`: starts the Streamlit demo page over a model folder and an embedding index.

Without arguments it serves the embedded demo's outputs (`make demo` trains the model into `outputs/demo` and
builds `outputs/demo/index.npz`). Runs `streamlit run streamlit_app.py -- --model M --index I` in a child
process and returns its exit status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL = "outputs/demo"
DEFAULT_INDEX = "outputs/demo/index.npz"
APP_FILE = Path(__file__).with_name("streamlit_app.py")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: %(default)s)")
    parser.add_argument("--index", default=DEFAULT_INDEX,
                        help="embedding index from `medclip embed` (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="localhost",
                        help="interface to serve on; 0.0.0.0 to reach the app from other machines")
    parser.add_argument("--headless", action="store_true", help="do not open a browser tab")
    return parser


def _absolute(path: str) -> str:
    """Local paths made absolute (the page must not depend on the server's working folder); Hub ids kept."""
    return str(Path(path).absolute()) if Path(path).exists() else path


def streamlit_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_FILE),
        "--server.port", str(args.port),
        "--server.address", args.address,
        "--server.headless", "true" if args.headless else "false",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--", "--model", _absolute(args.model), "--index", _absolute(args.index),
    ]


def missing_demo_outputs(args: argparse.Namespace) -> list[str]:
    """The default demo outputs that are asked for but not there yet."""
    missing = []
    if args.model == DEFAULT_MODEL and not (Path(DEFAULT_MODEL) / "config.json").is_file():
        missing.append(f"{DEFAULT_MODEL}/config.json")
    if args.index == DEFAULT_INDEX and not Path(DEFAULT_INDEX).is_file():
        missing.append(DEFAULT_INDEX)
    return missing


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_demo_outputs(args)
    if missing:
        print(f"medclip app: the demo's outputs are not there yet ({', '.join(missing)} under {Path.cwd()}): "
              "run `make demo` first or pass --model/--index", file=sys.stderr)
        return 2
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("medclip app: streamlit is not installed: pip install -e '.[app]'", file=sys.stderr)
        return 2
    print(f"medclip app: serving {args.model} with {args.index} at http://{args.address}:{args.port}", flush=True)
    try:
        return subprocess.call(streamlit_command(args))
    except KeyboardInterrupt:  # Ctrl-C reaches streamlit too, which stops by itself
        return 130
