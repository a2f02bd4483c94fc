"""Embeddings and generation from one CAFe model.

python examples/quickstart.py                       # offline, on a tiny locally built checkpoint
python examples/quickstart.py --model llava-hf/llava-onevision-qwen2-0.5b-si-hf   # a real one
"""

import argparse
import tempfile

import torch
from PIL import Image

from cafe import CafeForConditionalGeneration
from cafe.testing import build_tiny_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or local folder (default: build a tiny checkpoint offline)")
    args = parser.parse_args()
    path = args.model or build_tiny_checkpoint(tempfile.mkdtemp(prefix="cafe-tiny-"))

    model = CafeForConditionalGeneration.from_pretrained(path)
    images = [Image.new("RGB", (64, 48), (220, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 220))]
    texts = ["a red picture", "a blue picture"]

    image_emb = model.encode(images=images)  # [2, hidden], unit norm
    text_emb = model.encode(texts=texts)
    print("image x text cosine similarities:\n", (image_emb @ text_emb.T).numpy().round(3))

    processor = model.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=images[0], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    print("generation:", processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
