"""``python -m loraprune.families.gemma3 MODEL_DIR OUT_DIR``: a multimodal Gemma 3's language model saved
alone as a text-only ``gemma3_text`` checkpoint (:mod:`.text_model`), which ``loraprune prune`` prunes."""

from __future__ import annotations

import argparse
import sys

from loraprune.families.gemma3.text_model import save_language_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraprune.families.gemma3",
        description="Save the language model of a multimodal Gemma 3 (gemma3) as a text-only gemma3_text "
        "checkpoint (the vision tower left out), to prune with `loraprune prune`.",
    )
    parser.add_argument("model_dir", help="Hugging Face folder of a multimodal Gemma 3 (model_type gemma3)")
    parser.add_argument("out", help="folder to write (new, or empty)")
    args = parser.parse_args(argv)
    try:
        out = save_language_model(args.model_dir, args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} (gemma3_text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
