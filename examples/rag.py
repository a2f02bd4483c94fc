"""One-model multimodal RAG: retrieve with CAFe embeddings, answer with generate(), same weights.

    pip install "cafe-vlm[rag]"            # faiss-cpu, the vector index
    python examples/rag.py                 # offline: a tiny checkpoint and a demo corpus built locally

    # a real CAFe checkpoint (a folder or Hub id), your own corpus, on a GPU:
    python examples/rag.py --model path/to/cafe-llava-onevision-7b --corpus path/to/folder \\
        --question "Which colour is the square?" --dtype bfloat16 --index-dir my-index

The corpus folder holds images (.png .jpg .jpeg .webp .bmp .gif) and texts (.txt .md; each
blank-line-separated paragraph is one passage). The model embeds everything once; a question
retrieves the closest images and passages, and the same model answers conditioned on them. On the
tiny checkpoint the weights are random, so retrieval and answers are nonsense, but every step is
the one a real checkpoint runs. A stock LLaVA-OneVision checkpoint also works (its embeddings
are those of the untrained prompt, so retrieval is weaker than after CAFe training).

The vectors live in a FAISS index (``IndexFlatIP`` over unit-norm vectors: exact cosine search),
one per modality, saved to ``--index-dir`` with the documents' metadata and loaded from there on
the next run instead of embedding the corpus again (``--index torch`` keeps them in a torch matrix,
for installs without FAISS).

The question is embedded once and its computation is reused to answer it (GritLM's query caching,
multimodal): the answer prompt starts with the same system turn, user header, question image and
question text as the embedding prompt, so generation continues from the embedding pass's KV cache
and neither the LLM prefill of those tokens nor the vision pass of the question's image runs again
(`cafe.inference.generate_reusing_prefix`). ``--compare-reuse`` also answers without reuse and
prints both latencies and whether the answers are identical.

The script ends by measuring what CAFe saves: the memory of this one model against the usual
alternative, an embedder plus a separate VLM of the same sizes (the embedder being the same
backbone without the LM head, as sentence-transformers or an E5-V / VLM2Vec-style embedder
loads it). Reported: parameter bytes, the process RSS growth once the weights have been read, and
on CUDA the allocated GPU memory (``--skip-memory-comparison`` skips loading the second model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cafe import CafeForConditionalGeneration
from cafe.inference import EmbeddedPrompt, embed_keeping_cache, generate_reusing_prefix

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
INDEX_BACKENDS = ("faiss", "torch")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "The FAISS index needs faiss-cpu: pip install 'cafe-vlm[rag]' (or faiss-cpu / faiss-gpu), or run with "
            "--index torch to keep the vectors in a torch matrix."
        ) from None
    return faiss


class VectorIndex:
    """Unit-norm vectors searched by inner product, i.e. exact cosine similarity.

    ``backend="faiss"``: a ``faiss.IndexFlatIP`` (exact search; swap in ``IndexHNSWFlat`` or
    ``IndexIVFFlat`` for millions of vectors). ``backend="torch"``: a ``[n, dim]`` float32 matrix.
    """

    def __init__(self, dim: int, backend: str = "faiss"):
        if backend not in INDEX_BACKENDS:
            raise ValueError(f"Unknown index backend {backend!r}; choose one of {INDEX_BACKENDS}.")
        self.dim, self.backend = dim, backend
        self._faiss = _faiss().IndexFlatIP(dim) if backend == "faiss" else None
        self._matrix = torch.empty(0, dim)

    def __len__(self) -> int:
        return self._faiss.ntotal if self._faiss is not None else self._matrix.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored vectors (float32)."""
        return len(self) * self.dim * 4

    def add(self, vectors: torch.Tensor) -> None:
        """Add ``[n, dim]`` unit-norm vectors."""
        vectors = vectors.detach().float().cpu()
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"Expected vectors of shape [n, {self.dim}], got {tuple(vectors.shape)}.")
        if self._faiss is not None:
            self._faiss.add(vectors.contiguous().numpy())
        else:
            self._matrix = torch.cat([self._matrix, vectors])

    def search(self, query: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
        """The ``k`` best ``(scores, positions)`` for a ``[dim]`` query, best first."""
        k = min(k, len(self))
        if k <= 0:
            return [], []
        query = query.detach().float().cpu().reshape(1, self.dim)
        if self._faiss is not None:
            scores, positions = self._faiss.search(query.contiguous().numpy(), k)
            return scores[0].tolist(), positions[0].tolist()
        best = (self._matrix @ query[0]).topk(k)
        return best.values.tolist(), best.indices.tolist()

    def save(self, path: Path) -> Path:
        path = Path(path).with_suffix(".faiss" if self._faiss is not None else ".pt")
        if self._faiss is not None:
            _faiss().write_index(self._faiss, str(path))
        else:
            torch.save(self._matrix, path)
        return path

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        path = Path(path)
        index = cls(dim, "faiss" if path.suffix == ".faiss" else "torch")
        if index._faiss is not None:
            index._faiss = _faiss().read_index(str(path))
        else:
            index._matrix = torch.load(path, weights_only=True)
        if index._faiss is not None and index._faiss.d != dim:
            raise ValueError(f"{path} holds {index._faiss.d}-dimensional vectors, the model embeds {dim}.")
        return index


@dataclass
class Index:
    """The corpus and its vectors, one `VectorIndex` per modality.

    Images and passages are ranked separately: text->image and text->text cosine scores live on
    different scales (the modality gap), so one mixed ranking would favour one modality.
    """

    images: list[Document]
    image_vectors: VectorIndex
    passages: list[Document]
    passage_vectors: VectorIndex

    MANIFEST = "documents.json"

    @property
    def nbytes(self) -> int:
        return self.image_vectors.nbytes + self.passage_vectors.nbytes

    def save(self, folder: str | os.PathLike) -> Path:
        """Write both vector indexes and the documents' metadata (image files by name, passages in full)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "images": self.image_vectors.save(folder / "images").name,
            "passages": self.passage_vectors.save(folder / "passages").name,
        }
        manifest = {
            "dim": self.image_vectors.dim,
            "files": files,
            "images": [d.source for d in self.images],
            "passages": [{"source": d.source, "text": d.text} for d in self.passages],
        }
        (folder / self.MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, corpus: str | os.PathLike) -> Index:
        """Read a saved index; images are re-opened from the ``corpus`` folder they were indexed from."""
        folder = Path(folder)
        manifest = json.loads((folder / cls.MANIFEST).read_text(encoding="utf-8"))
        images = []
        for source in manifest["images"]:
            with Image.open(Path(corpus) / source) as image:
                images.append(Document(source=source, image=image.convert("RGB")))
        passages = [Document(source=p["source"], text=p["text"]) for p in manifest["passages"]]
        index = cls(
            images=images,
            image_vectors=VectorIndex.load(folder / manifest["files"]["images"], manifest["dim"]),
            passages=passages,
            passage_vectors=VectorIndex.load(folder / manifest["files"]["passages"], manifest["dim"]),
        )
        if len(index.image_vectors) != len(images) or len(index.passage_vectors) != len(passages):
            raise ValueError(f"{folder}: the vector counts do not match {cls.MANIFEST}; rebuild the index.")
        return index


def build_index(
    model, images: list[Document], passages: list[Document], batch_size: int = 8, backend: str = "faiss"
) -> Index:
    """Embed the corpus (``model.encode``: length-sorted batches, progress bar on long corpora) into
    one `VectorIndex` per modality."""
    dim = model.config.get_text_config().hidden_size
    image_vectors, passage_vectors = VectorIndex(dim, backend), VectorIndex(dim, backend)
    if images:
        image_vectors.add(model.encode(images=[d.image for d in images], batch_size=batch_size))
    if passages:
        passage_vectors.add(model.encode(texts=[d.text for d in passages], batch_size=batch_size))
    return Index(images=images, image_vectors=image_vectors, passages=passages, passage_vectors=passage_vectors)


def embed_question(model, question: str, image: Image.Image | None = None) -> EmbeddedPrompt:
    """The question's embedding, with the KV cache of its embedding prompt kept for `answer`."""
    return embed_keeping_cache(model, question if image is None else {"image": image, "text": question})


def retrieve(index: Index, query: torch.Tensor, k_images: int = 1, k_passages: int = 2):
    """The top images and passages for a ``[dim]`` query vector, each as a list of ``(score, Document)``."""

    def top(vectors: VectorIndex, documents: list[Document], k: int):
        scores, positions = vectors.search(query, k)
        return [(score, documents[i]) for score, i in zip(scores, positions, strict=True)]

    return top(index.image_vectors, index.images, k_images), top(index.passage_vectors, index.passages, k_passages)


# ----------------------------------------------------------------------------- generation
def build_rag_prompt(
    model, question: str, images: list[Document], passages: list[Document], question_image: Image.Image | None = None
) -> str:
    """The answer prompt, in the conversation format the model was LM-trained on (``lm_chat_template``:
    ChatML with the CAFe system turn).

    It opens exactly like the question's embedding prompt (system turn, user header, the question's
    image, the question's text), which is what lets `answer` reuse that prompt's computation; the
    retrieved passages and images follow.
    """
    context = "\n".join(f"[{i}] {d.text}" for i, d in enumerate(passages, start=1))
    content = [{"type": "image"}] if question_image is not None else []
    content.append({"type": "text", "text": question})
    if images or passages:
        content.append({"type": "text", "text": "\n\nContext:\n"})
        content += [{"type": "image"} for _ in images]
        if passages:
            content.append({"type": "text", "text": context + "\n"})
    content.append({"type": "text", "text": "\nAnswer the question briefly."})
    return model.processor.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=model.cafe_settings.lm_chat_template,
        add_generation_prompt=True,
    )


@dataclass
class Answer:
    text: str
    seconds: float
    reused_tokens: int  # prompt tokens read from the question's cache (0: computed anew)
    token_ids: list[int]


def answer(
    model,
    question: str,
    images: list[Document],
    passages: list[Document],
    max_new_tokens: int = 64,
    question_image: Image.Image | None = None,
    embedded: EmbeddedPrompt | None = None,
) -> Answer:
    """Generate greedily; with ``embedded`` (from `embed_question`), the prompt's shared opening
    comes from the question's embedding pass instead of being computed again."""
    processor = model.processor
    prompt = build_rag_prompt(model, question, images, passages, question_image)
    shown = ([question_image] if question_image is not None else []) + [d.image for d in images]
    batch = processor(images=shown or None, text=prompt, return_tensors="pt")
    batch = batch.to(model.device, model.dtype)  # casts only the floating-point tensors (pixels)
    started = time.perf_counter()
    with torch.inference_mode():
        if embedded is not None:
            output, reused = generate_reusing_prefix(
                model, embedded, batch, max_new_tokens=max_new_tokens, do_sample=False
            )
        else:
            output, reused = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False), 0
    seconds = time.perf_counter() - started
    new_tokens = output[0, batch["input_ids"].shape[1] :]
    return Answer(processor.decode(new_tokens, skip_special_tokens=True).strip(), seconds, reused, new_tokens.tolist())


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
    parser.add_argument("--question-image", help="an image file the question is about (embedded with the question)")
    parser.add_argument("--k-images", type=int, default=1, help="images to retrieve")
    parser.add_argument("--k-passages", type=int, default=2, help="text passages to retrieve")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help='"auto", "bfloat16", "float16" or "float32"')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--index",
        default="faiss",
        choices=INDEX_BACKENDS,
        help="vector store: FAISS (pip install 'cafe-vlm[rag]') or a torch matrix",
    )
    parser.add_argument(
        "--index-dir",
        help="load the index from here if it holds one, else build it and save it "
        "here (default: a temporary folder, saved and reloaded once to show the round trip)",
    )
    parser.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="answer without reusing the question's embedding computation",
    )
    parser.add_argument(
        "--compare-reuse",
        action="store_true",
        help="answer with and without reuse: latencies, and whether the answers are identical",
    )
    parser.add_argument("--skip-memory-comparison", action="store_true", help="do not load the second model")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cafe-rag-") as workdir:
        return run(args, Path(workdir))


def load_or_build_index(model, corpus: Path, index_dir: Path, backend: str) -> tuple[Index, str]:
    if (index_dir / Index.MANIFEST).is_file():
        return Index.load(index_dir, corpus), f"Loaded the index from {index_dir}"
    if backend == "faiss":
        _faiss()  # fail before embedding the corpus, not after
    images, passages = load_corpus(corpus)
    index = build_index(model, images, passages, backend=backend)
    index.save(index_dir)
    return index, f"Indexed {len(images)} images and {len(passages)} passages from {corpus}; saved to {index_dir}"


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

    index_dir = Path(args.index_dir) if args.index_dir else workdir / "index"
    index, how = load_or_build_index(model, corpus, index_dir, args.index)
    if not args.index_dir:
        index = Index.load(index_dir, corpus)  # the round trip a later run makes
        how += " and reloaded"
    print(f"{how} ({args.index}; embedding size {index.image_vectors.dim}, {index.nbytes:,} bytes of vectors).")

    question_image = None
    if args.question_image:
        with Image.open(args.question_image) as opened:
            question_image = opened.convert("RGB")
    with torch.inference_mode():
        embedded = embed_question(model, args.question, question_image)
    found_images, found_passages = retrieve(index, embedded.embedding, args.k_images, args.k_passages)
    print(f"\nQuestion: {args.question}" + (f" (with {args.question_image})" if args.question_image else ""))
    for score, document in found_images:
        print(f"  image   {score:+.3f}  {document.source}")
    for score, document in found_passages:
        print(f"  passage {score:+.3f}  {document.source}: {document.text}")
    context = ([d for _, d in found_images], [d for _, d in found_passages])
    reply = answer(
        model, args.question, *context, args.max_new_tokens, question_image, embedded if args.reuse else None
    )
    print(
        f"Answer: {reply.text!r} ({reply.seconds:.2f} s, {reply.reused_tokens} prompt tokens reused from the "
        "question's embedding pass)"
    )
    plain = None
    if args.compare_reuse:
        # Both after the answer above, so neither pays a first call's warm-up.
        reused = answer(model, args.question, *context, args.max_new_tokens, question_image, embedded)
        plain = answer(model, args.question, *context, args.max_new_tokens, question_image, None)
        print(
            f"Answer latency: {reused.seconds:.3f} s reusing {reused.reused_tokens} prompt tokens, "
            f"{plain.seconds:.3f} s computing them; identical answer: {reused.token_ids == plain.token_ids}"
        )

    comparison = None
    if not args.skip_memory_comparison:
        comparison = compare_memory(model, args.model, dtype, cafe_rss, cafe_accelerator)
        print(f"\nMemory ({args.device}, {model.dtype}):\n{comparison.format()}")
        print(
            f"vector index: {index.nbytes:,} bytes ({len(index.image_vectors) + len(index.passage_vectors)} "
            f"vectors of {index.image_vectors.dim} float32)"
        )
        if comparison.cafe_parameter_bytes < 2**27:
            print("(tiny checkpoint: RSS growth is dominated by allocator noise; parameter bytes are exact)")
    return {
        "model": model,
        "index": index,
        "index_dir": index_dir,
        "question": embedded,
        "images": found_images,
        "passages": found_passages,
        "answer": reply,
        "answer_without_reuse": plain,
        "memory": comparison,
    }


if __name__ == "__main__":
    main()
