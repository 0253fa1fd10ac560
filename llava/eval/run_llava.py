"""Answer one query about one or more images and print the answer (upstream's ``run_llava``).

    python -m llava.eval.run_llava --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg \\
        --query "What is in the picture?" [--method pio --budget 64]
"""

from __future__ import annotations

import argparse
import logging
import re

from llava.constants import (
    IMAGE_PLACEHOLDER,
)
from llava.eval import runner

logger = logging.getLogger(__name__)


def infer_conv_mode(model_name: str) -> str:
    """Upstream's choice of template from the checkpoint name."""
    n = model_name.lower()
    if "llama-2" in n:
        return "llava_llama_2"
    if "mistral" in n:
        return "mistral_instruct"
    if "v1.6-34b" in n:
        return "chatml_direct"
    if "v1" in n:
        return "llava_v1"
    if "mpt" in n:
        return "mpt"
    return "llava_v0"


def load_images(spec: str, sep: str):
    images = []
    for path in spec.split(sep):
        if path.startswith(("http://", "https://")):
            import io
            import urllib.request

            from PIL import Image, UnidentifiedImageError

            try:
                with urllib.request.urlopen(path, timeout=30) as r:  # noqa: S310 (user-given URL)
                    data = r.read()
            except (OSError, ValueError) as err:  # no network, a bad address, an HTTP error
                reason = getattr(err, "reason", None) or err
                raise FileNotFoundError(f"--image-file {path}: cannot download it ({reason}); download it where there "
                                        "is network and pass the file's path") from None
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"--image-file {path}: what it returned is not an image ({err})") from None
        else:
            images.append(runner.load_image(path))
    return images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Ask a LLaVA model about an image.")
    p.add_argument("--image-file", type=str, required=True, help="path(s) or URL(s), separated by --sep")
    p.add_argument("--query", type=str, required=True)
    p.add_argument("--sep", type=str, default=",")
    runner.add_common_args(p, conv_mode=None, max_new_tokens=512)
    args = p.parse_args(argv)
    runner.setup_logging()
    from llava.mm_utils import get_model_name_from_path

    args.llava_conv_mode = infer_conv_mode(get_model_name_from_path(args.model_path))  # when --conv-mode is not given
    method = runner.check_args(args)
    if args.loyalty_to:
        raise ValueError("--loyalty-to compares the answers of a question file with another run's; run_llava answers "
                         "one query (use model_vqa_loader)")
    if args.batch_size > 1:
        raise ValueError(f"--batch-size {args.batch_size}: run_llava answers one query; batches are for question "
                         "files (model_vqa_loader and the other runners)")
    images = load_images(args.image_file, args.sep)
    tok, model, proc, _ = runner.load_model(args, method)
    image_token = runner.image_token(getattr(model.config, "mm_use_im_start_end", False))
    query = args.query
    if IMAGE_PLACEHOLDER in query:
        query = re.sub(re.escape(IMAGE_PLACEHOLDER), image_token, query)
    else:
        query = "\n".join([image_token] * len(images) + [query])
    ids, pixels, sizes = runner.encode(runner.chat_prompt(query, args.conv_mode), images, tok, proc, model.config)
    text, state, _ = runner.generate(model, tok, ids, runner.to_model(pixels, model), sizes, args, method)
    if method is not None:
        for rec in state.report():
            logger.info("visual tokens %d -> %s (average %.1f per layer)", rec["n_visual"],
                        [s["after"] for s in rec["stages"]], rec["avg_visual_tokens"])
    print(text)


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
