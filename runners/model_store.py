"""Models baked into a Bento: import folders into the BentoML model store, resolve them at start.

`MODEL_NAMES` entries of the form `bento:NAME[:VERSION]` load from the store (inside a built Bento
or its image, the models that `bentofile.yaml` lists are there), so a container starts without
any network. Import step, run before `bentoml build` (`make bento` does it):

    python -m runners.model_store import Qwen/Qwen3-Embedding-0.6B --name qwen3-embedding-0.6b
    python -m runners.model_store import /path/to/local/folder --name my-model --served-name my/model
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

PREFIX = "bento:"


def import_folder(source: str, name: str, served_name: str | None = None) -> str:
    """Copy a model folder (or a hub id, downloaded first) into the store; return the tag."""
    import bentoml

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source))
    with bentoml.models.create(name, labels={"served_name": served_name or source}) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git*", "*.md"))
    return str(model.tag)


def resolve(entry: str) -> tuple[str, str]:
    """`bento:NAME[:VERSION]` → (folder in the store, served name from its label)."""
    import bentoml

    tag = entry[len(PREFIX):]
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise LookupError(
            f"{entry!r} is not in the BentoML model store: import it with "
            f"`python -m runners.model_store import <folder or hub id> --name {tag.split(':')[0]}`"
        ) from None
    return model.path, model.info.labels.get("served_name") or model.tag.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="copy a model folder or hub id into the BentoML model store")
    imp.add_argument("source", help="local folder or hub id")
    imp.add_argument("--name", required=True, help="store name, e.g. qwen3-embedding-0.6b")
    imp.add_argument("--served-name", help="the model name clients send (default: the source)")
    args = parser.parse_args()
    print(import_folder(args.source, args.name, args.served_name))


if __name__ == "__main__":
    main()
