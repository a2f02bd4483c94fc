"""One-model multimodal RAG: retrieve with CAFe embeddings, answer with generate(), same weights.

    python examples/rag.py                 # offline: a tiny checkpoint and a demo corpus built locally

    # a real CAFe checkpoint (a folder or Hub id), your own corpus, on a GPU:
    python examples/rag.py --model path/to/cafe-llava-onevision-7b --corpus path/to/folder \\
        --question "Which colour is the square?" --dtype bfloat16

The corpus folder holds images (.png .jpg .jpeg .webp .bmp .gif) and texts (.txt .md; each
blank-line-separated paragraph is one passage). The model embeds everything once; a question
retrieves the closest images and passages, and the same model answers conditioned on them. On the
tiny checkpoint the weights are random, so retrieval and answers are nonsense, but every step is
the one a real checkpoint runs. A stock LLaVA-OneVision checkpoint also works (its embeddings
are those of the untrained prompt, so retrieval is weaker than after CAFe training).

The script ends by measuring what CAFe saves: the memory of this one model against the usual
alternative, an embedder plus a separate VLM of the same sizes (the embedder being the same
backbone without the LM head, as sentence-transformers or an E5-V / VLM2Vec-style embedder
loads it). Reported: parameter bytes, the process RSS growth once the weights have been read, and
on CUDA the allocated GPU memory (``--skip-memory-comparison`` skips loading the second model).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cafe import CafeForConditionalGeneration

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
TEXT_SUFFIXES = {".txt", ".md"}


# ----------------------------------------------------------------------------- corpus
@dataclass
class Document:
    """One retrievable item: an image file or a text passage."""

    source: str  # file name (and paragraph number for passages)
    image: Image.Image | None = None
    text: str | None = None


def load_corpus(folder: str | os.PathLike) -> tuple[list[Document], list[Document]]:
    """Images and text passages of `folder` (not recursive), in file-name order."""
    images, passages = [], []
    for path in sorted(Path(folder).iterdir()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                images.append(Document(source=path.name, image=image.convert("RGB")))
        elif suffix in TEXT_SUFFIXES:
            paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
            passages += [Document(source=f"{path.name}#{i}", text=p) for i, p in enumerate(paragraphs, start=1) if p]
    if not images and not passages:
        raise ValueError(f"No images ({sorted(IMAGE_SUFFIXES)}) or texts ({sorted(TEXT_SUFFIXES)}) in {folder}.")
    return images, passages


def build_demo_corpus(folder: str | os.PathLike) -> Path:
    """A small corpus of shape pictures and facts about them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        "red_square.png": ("red", lambda d: d.rectangle((16, 16, 48, 48), fill="red")),
        "blue_circle.png": ("blue", lambda d: d.ellipse((16, 16, 48, 48), fill="blue")),
        "green_triangle.png": ("green", lambda d: d.polygon([(32, 12), (52, 52), (12, 52)], fill="green")),
    }
    for name, (_, draw) in shapes.items():
        image = Image.new("RGB", (64, 64), "white")
        draw(ImageDraw.Draw(image))
        image.save(folder / name)
    (folder / "facts.txt").write_text(
        "The square in the collection is red and sits in the middle of a white background.\n\n"
        "The circle is blue. It was drawn with the same size as the square.\n\n"
        "The triangle is green and points upwards.\n\n"
        "All pictures are 64 by 64 pixels.\n",
        encoding="utf-8",
    )
    return folder


# ----------------------------------------------------------------------------- index and retrieval
@dataclass
class Index:
    """Unit-norm embeddings of the corpus, one matrix per modality.

    Images and passages are ranked separately: text->image and text->text cosine scores live on
    different scales (the modality gap), so one mixed ranking would favour one modality.
    """

    images: list[Document]
    image_embeddings: torch.Tensor
    passages: list[Document]
    passage_embeddings: torch.Tensor


def build_index(model, images: list[Document], passages: list[Document], batch_size: int = 8) -> Index:
    hidden = model.config.get_text_config().hidden_size
    empty = torch.empty(0, hidden)
    return Index(
        images=images,
        image_embeddings=model.encode(images=[d.image for d in images], batch_size=batch_size) if images else empty,
        passages=passages,
        passage_embeddings=model.encode(texts=[d.text for d in passages], batch_size=batch_size) if passages else empty,
    )


def retrieve(model, index: Index, question: str, k_images: int = 1, k_passages: int = 2):
    """The top images and passages for `question`, each as a list of ``(score, Document)``."""
    query = model.encode([question])[0]

    def top(embeddings: torch.Tensor, documents: list[Document], k: int):
        if k <= 0 or not documents:
            return []
        scores = embeddings @ query  # cosine: both sides are unit norm
        best = scores.topk(min(k, len(documents)))
        return [(score, documents[i]) for score, i in zip(best.values.tolist(), best.indices.tolist())]

    images = top(index.image_embeddings, index.images, k_images)
    passages = top(index.passage_embeddings, index.passages, k_passages)
    return images, passages


# ----------------------------------------------------------------------------- generation
def build_rag_prompt(processor, question: str, images: list[Document], passages: list[Document]) -> str:
    """A user turn holding the retrieved images, then the passages and the question, in the
    backbone's own generation chat template."""
    context = "\n".join(f"[{i}] {d.text}" for i, d in enumerate(passages, start=1))
    text = (f"Context:\n{context}\n\n" if passages else "") + f"Question: {question}\nAnswer briefly."
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def answer(model, question: str, images: list[Document], passages: list[Document], max_new_tokens: int = 64) -> str:
    processor = model.processor
    prompt = build_rag_prompt(processor, question, images, passages)
    batch = processor(images=[d.image for d in images] or None, text=prompt, return_tensors="pt")
    batch = batch.to(model.device, model.dtype)  # casts only the floating-point tensors (pixels)
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- memory
def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def make_resident(module: torch.nn.Module) -> None:
    """Read every parameter once.

    transformers memory-maps safetensors files on CPU, so freshly loaded weights only enter the
    process's resident memory when first read. A serving model has read all of them; measuring
    before that would count almost nothing.
    """
    with torch.inference_mode():
        for parameter in module.parameters():
            parameter.sum()


def process_rss() -> int | None:
    """Resident set size of this process in bytes (psutil, else /proc); None where unavailable."""
    gc.collect()
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def accelerator_allocated(device) -> int | None:
    """Bytes allocated by torch on a CUDA device (RSS does not see GPU memory); None elsewhere."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


@dataclass
class MemoryComparison:
    cafe_parameter_bytes: int
    cafe_rss_bytes: int | None
    embedder_parameter_bytes: int
    embedder_rss_bytes: int | None
    cafe_accelerator_bytes: int | None = None
    embedder_accelerator_bytes: int | None = None

    @property
    def two_model_parameter_bytes(self) -> int:
        return self.cafe_parameter_bytes + self.embedder_parameter_bytes

    @property
    def two_model_rss_bytes(self) -> int | None:
        return _sum(self.cafe_rss_bytes, self.embedder_rss_bytes)

    @property
    def two_model_accelerator_bytes(self) -> int | None:
        return _sum(self.cafe_accelerator_bytes, self.embedder_accelerator_bytes)

    def format(self) -> str:
        def size(value: int | None) -> str:
            return "n/a" if value is None else f"{value / 2**20:,.2f} MiB"

        rows = [
            ("parameter bytes", self.cafe_parameter_bytes, self.two_model_parameter_bytes),
            ("process RSS growth (weights read)", self.cafe_rss_bytes, self.two_model_rss_bytes),
        ]
        if self.cafe_accelerator_bytes is not None:
            rows.append(("GPU memory growth", self.cafe_accelerator_bytes, self.two_model_accelerator_bytes))
        width = max(len(name) for name, *_ in rows)
        lines = [f"{'':<{width}}  {'one CAFe model':>16}  {'embedder + separate VLM':>24}"]
        lines += [f"{name:<{width}}  {size(one):>16}  {size(two):>24}" for name, one, two in rows]
        ratio = self.two_model_parameter_bytes / self.cafe_parameter_bytes
        lines.append(f"the two-model setup holds {ratio:.2f}x the parameter bytes of CAFe")
        return "\n".join(lines)


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def compare_memory(model, path, dtype, cafe_rss_bytes: int | None, cafe_accelerator_bytes: int | None = None):
    """Load the embedder a two-model deployment would add, and measure both setups.

    The separate VLM of that deployment is the same stock model as the CAFe model, so its cost is
    the CAFe model's own; the embedder is the same backbone without the LM head.
    """
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    before, before_accelerator = process_rss(), accelerator_allocated(model.device)
    # The embedder does not use the checkpoint's LM head, which transformers would report as an
    # unexpected weight: expected here, so keep the output readable.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        embedder = AutoModel.from_pretrained(path, dtype=dtype).to(model.device)
    finally:
        transformers_logging.set_verbosity(verbosity)
    make_resident(embedder)
    comparison = MemoryComparison(
        cafe_parameter_bytes=parameter_bytes(model),
        cafe_rss_bytes=cafe_rss_bytes,
        embedder_parameter_bytes=parameter_bytes(embedder),
        embedder_rss_bytes=_delta(before, process_rss()),
        cafe_accelerator_bytes=cafe_accelerator_bytes,
        embedder_accelerator_bytes=_delta(before_accelerator, accelerator_allocated(model.device)),
    )
    del embedder
    gc.collect()
    return comparison


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="CAFe checkpoint folder or Hub id (default: build a tiny one offline)")
    parser.add_argument("--corpus", help="folder of images and .txt/.md files (default: a generated demo corpus)")
    parser.add_argument("--question", default="Which colour is the square?")
    parser.add_argument("--k-images", type=int, default=1, help="images to retrieve")
    parser.add_argument("--k-passages", type=int, default=2, help="text passages to retrieve")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help='"auto", "bfloat16", "float16" or "float32"')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-memory-comparison", action="store_true", help="do not load the second model")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cafe-rag-") as workdir:
        return run(args, Path(workdir))


def run(args, workdir: Path) -> dict:
    if args.model is None:
        from cafe.testing import build_tiny_checkpoint

        args.model = str(build_tiny_checkpoint(workdir / "tiny-checkpoint"))
    corpus = Path(args.corpus) if args.corpus else build_demo_corpus(workdir / "corpus")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)

    # One model, loaded once, serves retrieval and generation.
    rss_before, accelerator_before = process_rss(), accelerator_allocated(args.device)
    model = CafeForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    make_resident(model)
    cafe_rss = _delta(rss_before, process_rss())
    cafe_accelerator = _delta(accelerator_before, accelerator_allocated(args.device))

    images, passages = load_corpus(corpus)
    index = build_index(model, images, passages)
    size = (index.image_embeddings if images else index.passage_embeddings).shape[-1]
    print(f"Indexed {len(images)} images and {len(passages)} passages from {corpus} (embedding size {size}).")

    found_images, found_passages = retrieve(model, index, args.question, args.k_images, args.k_passages)
    print(f"\nQuestion: {args.question}")
    for score, document in found_images:
        print(f"  image   {score:+.3f}  {document.source}")
    for score, document in found_passages:
        print(f"  passage {score:+.3f}  {document.source}: {document.text}")
    reply = answer(
        model, args.question, [d for _, d in found_images], [d for _, d in found_passages], args.max_new_tokens
    )
    print(f"Answer: {reply!r}")

    comparison = None
    if not args.skip_memory_comparison:
        comparison = compare_memory(model, args.model, dtype, cafe_rss, cafe_accelerator)
        print(f"\nMemory ({args.device}, {model.dtype}):\n{comparison.format()}")
        if comparison.cafe_parameter_bytes < 2**27:
            print("(tiny checkpoint: RSS growth is dominated by allocator noise; parameter bytes are exact)")
    return {
        "model": model,
        "index": index,
        "images": found_images,
        "passages": found_passages,
        "answer": reply,
        "memory": comparison,
    }


if __name__ == "__main__":
    main()
