"""`python -m streamkv.fetch`: put the offline model and texts into the local cache (idempotent).

Used by `make setup`; each part is skipped when already cached, so a second call takes seconds."""

from __future__ import annotations

import sys

from streamkv.corpora import fetch_all
from streamkv.models import converted_smollm2_dir


def main() -> int:
    texts = fetch_all()
    model_dir = converted_smollm2_dir()
    for name, path in sorted(texts.items()):
        print(f"text {name}: {path}", file=sys.stderr)
    print(f"model smollm2_135m: {model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
