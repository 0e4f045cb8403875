"""Saved transformers models → a model, its example inputs and calibration samples (offline).

What ``mta-rewrite capture`` reads: a folder written by transformers' ``save_pretrained`` (its
``config.json`` names the model class), a GGUF file (a language model, dequantised) or a PEFT
adapter's folder (``adapter_config.json``: LoRA and the other adapters that merge into the weights,
merged into its base model, which must be saved locally too), loaded with no hub access. Examples
are token ids: windows of a text file's tokens when the folder has a tokenizer, else random ids of
the vocabulary (enough to capture: the graph does not depend on the values). Every loading error
is a ``ValueError`` with one line that says what to change.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .capture import _first_line
from .config import INT64_LIMIT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SavedModel:
    """A loaded model (eval mode, ``use_cache`` off), its tokenizer (or None) and what it is."""

    model: torch.nn.Module
    tokenizer: Any
    description: str  # "LlamaForCausalLM (sdpa attention) from /path (GGUF SmolLM2.gguf)"


ATTENTION = ("auto", "sdpa", "eager")


def load_saved_model(path: str | os.PathLike, attn_implementation: str = "auto", dtype: str = "float32",
                     experts_implementation: str | None = None) -> SavedModel:
    """The transformers model saved at ``path`` (a ``save_pretrained`` folder or a ``.gguf``
    file), loaded offline in ``dtype`` with ``attn_implementation``: "sdpa", "eager" or "auto"
    (SDPA where transformers has it for the model's class, else eager: GPT-OSS has eager only).
    ``experts_implementation``: transformers' for mixture-of-experts layers (None: its default;
    "batched_mm" exports to ONNX, the default's grouped products do not)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if attn_implementation not in ATTENTION:
        raise ValueError(f"--attn must be {', '.join(ATTENTION[:-1])} or {ATTENTION[-1]}, not {attn_implementation!r}")
    adapter = _adapter(path)
    if adapter is not None:
        return _merged(adapter, load_saved_model(adapter.base, attn_implementation, dtype, experts_implementation))
    path, folder, extra, transformers = _saved(path)
    gguf = bool(extra)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **extra)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for a bad config)
        raise ValueError(f"{path}: transformers cannot read its configuration: {_first_line(exc)[:300]}") from None
    cls = _model_class(transformers, config, gguf)
    has_sdpa = getattr(cls, "_supports_sdpa", True) is not False
    if attn_implementation == "sdpa" and not has_sdpa:
        raise ValueError(f"{cls.__name__} has no SDPA attention in transformers: capture it with --attn eager (or "
                         "auto, which picks eager for it)")
    if attn_implementation == "auto":
        attn_implementation = "sdpa" if has_sdpa else "eager"
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # (its loading bars: the command line has its own status)
    experts = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    try:
        with _quiet_gguf_conversion(gguf):
            model = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn_implementation,
                                        dtype=DTYPES[dtype], **extra, **experts)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: transformers cannot load it as {cls.__name__}: {_first_line(exc)[:300]}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    _no_cache(model.config)  # a KV cache is not a graph output
    tokenizer = _tokenizer(transformers, folder, extra)  # (None: examples are random ids)
    where = f"{folder}" + (f" (GGUF {path.name})" if gguf else "")
    return SavedModel(model, tokenizer, f"{type(model).__name__} ({attn_implementation} attention) from {where}")


def _no_cache(config) -> None:
    """``use_cache`` off in a model's configuration and in those it nests (a vision-language
    model's ``text_config``, which its language model reads: until 2026-12-07 ``capture`` of a saved
    LLaVA failed, its output holding a cache, with an error telling the user to call the model with
    use_cache=False, which the command line does not let them do)."""
    parts = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    parts += [getattr(config, name, None) for name in getattr(config, "sub_configs", {}) or {}]
    for part in parts:
        if part is not None and hasattr(part, "use_cache"):
            part.use_cache = False


@dataclass
class _Adapter:
    """A PEFT adapter saved with ``save_pretrained`` (``adapter_config.json``, no ``config.json``)
    and the local model it adapts (its ``base_model_name_or_path``)."""

    folder: Path
    base: Path
    kind: str  # PEFT's peft_type: "LORA", "IA3", "PREFIX_TUNING", …


def _adapter(path: str | os.PathLike) -> _Adapter | None:
    """The adapter saved at ``path``, or None where ``path`` is not an adapter's folder. Its base
    model must be saved locally (nothing is downloaded): its ``base_model_name_or_path`` as given, or
    relative to the adapter's folder; else a one-line error."""
    folder = Path(path)
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "config.json").is_file():
        return None
    import json

    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
        name, kind = settings.get("base_model_name_or_path"), str(settings.get("peft_type", "adapter"))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{config}: not a PEFT adapter configuration ({_first_line(exc)[:200]})") from None
    candidates = [] if not isinstance(name, str) or not name else \
        [Path(name).expanduser(), folder / Path(name).expanduser()]
    base = next((c for c in candidates if (c / "config.json").is_file() or (c.suffix == ".gguf" and c.is_file())), None)
    if base is None:
        raise ValueError(f"{path} is a PEFT adapter whose base model ({name!r}) is not saved here (nothing is "
                         "downloaded): set base_model_name_or_path in its adapter_config.json to the base model's "
                         "folder, or merge it (merge_and_unload) and save the model with save_pretrained")
    return _Adapter(folder, base, kind)


def _merged(adapter: _Adapter, saved: SavedModel) -> SavedModel:
    """``saved`` (the adapter's base model) with the adapter loaded and merged into its weights
    (PEFT's ``merge_and_unload``): a plain transformers model, as if saved merged. The adapter's
    tokenizer if it has one, else the base's. One-line errors without peft and for an adapter that
    does not merge into the weights (prompt and prefix tuning add tokens instead)."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{adapter.folder} is a PEFT adapter: loading it needs peft (pip install peft)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (peft's notes on the base's configuration)
            wrapped = peft.PeftModel.from_pretrained(saved.model, str(adapter.folder), is_trainable=False)
    except Exception as exc:  # noqa: BLE001  (peft raises many types for an adapter that does not fit)
        raise ValueError(f"{adapter.folder}: peft cannot load this adapter onto {type(saved.model).__name__}: "
                         f"{_first_line(exc)[:300]}") from None
    if not callable(getattr(wrapped, "merge_and_unload", None)):
        raise ValueError(f"{adapter.folder} is a {adapter.kind} adapter, which does not merge into the model's weights: "
                         "mta-rewrite takes adapters that do (LoRA and its kin, IA3)")
    model = wrapped.merge_and_unload().eval()
    import transformers  # (the base model is loaded: it is there)

    tokenizer = _tokenizer(transformers, adapter.folder, {}) or saved.tokenizer
    return SavedModel(model, tokenizer, f"{saved.description} with the {adapter.kind} adapter {adapter.folder} merged")


def _saved(path: str | os.PathLike):
    """(path, folder, from_pretrained's extra arguments, the transformers module) of a model saved
    at ``path`` (a ``save_pretrained`` folder or a ``.gguf`` file); one-line errors for anything
    else and for missing packages. Offline: nothing is downloaded."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    gguf = path.suffix.lower() == ".gguf"
    if gguf and not path.is_file():
        raise ValueError(f"{path} is not a GGUF file")
    folder, extra = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    if not gguf and not (folder / "config.json").is_file():
        raise ValueError(f"{path} is neither a folder saved with transformers' save_pretrained (it has no "
                         "config.json) nor a .gguf file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    try:
        import transformers
    except ImportError:
        raise ValueError("loading a saved model needs transformers: pip install 'mta-rewrite[models]'") from None
    if gguf:
        try:
            import gguf as _  # noqa: F401  (transformers reads the file with it)
        except ImportError:
            raise ValueError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return path, folder, extra, transformers


def _tokenizer(transformers, folder: Path, extra: dict):
    """The tokenizer saved beside a model (from a GGUF file: its own), or None."""
    try:
        with _quiet_gguf_conversion(bool(extra)):
            return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except Exception:  # noqa: BLE001  (none saved: transformers raises several types)
        return None


def separator_ids(tokenizer, ends: tuple[str, ...]) -> tuple[int, ...]:
    """The ids of every token of ``tokenizer`` whose text ends with one of ``ends``: boundary
    chunks' separators (``Boundaries``, ``--separators``) for lines (``"\\n"``) or sentences
    (``"\\n", ".", "?", "!"``), read from the tokenizer instead of by hand."""
    ends = tuple(ends)
    return tuple(i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith(ends))


def saved_separator_ids(path: str | os.PathLike, ends: tuple[str, ...] = ("\n",)) -> tuple[tuple[int, ...], int]:
    """(:func:`separator_ids` of the tokenizer saved with the model at ``path``, the vocabulary's
    size); a one-line error without a tokenizer or when no token ends so."""
    if not ends or not all(isinstance(end, str) and end for end in ends):
        raise ValueError(f"give one or more non-empty texts that separator tokens end with, got {list(ends)!r}")
    adapter = _adapter(path)  # (a PEFT adapter's tokenizer: its own, else its base model's)
    _, folder, extra, transformers = _saved(path if adapter is None else adapter.base)
    path = Path(path)
    tokenizer = (adapter and _tokenizer(transformers, adapter.folder, {})) or _tokenizer(transformers, folder, extra)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer saved beside it: its token ids cannot be read")
    ids = separator_ids(tokenizer, ends)
    if not ids:
        raise ValueError(f"no token of {path}'s tokenizer ends with {' or '.join(repr(e) for e in ends)}")
    return ids, len(tokenizer)


@contextlib.contextmanager
def _quiet_gguf_conversion(gguf: bool):
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which its progress-bar switch does not reach: it filled the command line's stderr
    with 30 redraws on every command that loads a GGUF file. Off while loading."""
    utils = None
    if gguf:
        try:
            from transformers import modeling_gguf_pytorch_utils as utils
        except ImportError:  # (another transformers layout: its bar stays)
            pass
    bar = getattr(utils, "tqdm", None)
    if bar is not None:
        utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            utils.tqdm = bar


def _model_class(transformers, config, gguf: bool):
    """The class the configuration names (``architectures``), else the task's Auto class."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if gguf else transformers.AutoModel


def token_inputs(model: torch.nn.Module) -> list[str]:
    """The token inputs of ``model``'s forward that an example fills (ids and their masks); a
    one-line error for a model that takes no ``input_ids``."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise ValueError(f"{type(model).__name__} takes no input_ids: the command line captures text models and image "
                         "models (pixel_values); capture others with the Python API (mta_rewrite.capture, then "
                         "save_program)")
    return [name for name in ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids") if name in params]


def is_image_model(model: torch.nn.Module) -> bool:
    """A model whose forward takes ``pixel_values`` and no ``input_ids`` (ViT, BEiT, Swin, DINOv2,
    CLIP's and SigLIP's vision towers …)."""
    params = inspect.signature(model.forward).parameters
    return "pixel_values" in params and "input_ids" not in params


def random_pixels(model: torch.nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """[batch, channels, size, size] standard-normal pixel values at the configuration's image
    size and channels (what the model's image processor would give, in scale), and a description."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3) or 3
    if isinstance(size, (list, tuple)):
        height, width = (int(x) for x in size[:2])
    elif isinstance(size, int):
        height = width = size
    else:
        raise ValueError(f"{type(model).__name__}'s configuration names no image_size: capture it with the Python API")
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return pixels, f"random pixel values, {batch} × {channels} × {height} × {width}"


def _check_count(option: str, value: int | None, minimum: int) -> None:
    """A count an option gives (None: not given): from ``minimum``, below 2**63 (torch's int64; a
    larger one reached torch as "failed to unpack … Overflow when unpacking long long")."""
    if value is not None and not minimum <= value < INT64_LIMIT:
        raise ValueError(f"{option} must be ≥ {minimum}" + (", below 2**63" if value >= minimum else "") +
                         f", got {value}")


def _read_text(path: str | os.PathLike, option: str) -> str:
    """The UTF-8 text of the file an option names; a one-line error naming the option."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:  # its strerror: str() adds "[Errno 21]" and the path again
        raise ValueError(f"cannot read {option} {path}: {exc.strerror or _first_line(exc)[:300]}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {option} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def text_windows(tokenizer, text: str, n: int, count: int) -> torch.Tensor:
    """``count`` consecutive windows of ``n`` tokens of ``text``: [count, n] token ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    if ids.numel() < n * count:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {count} window(s) of {n}: give a longer text "
                         "or fewer tokens")
    return ids[: n * count].view(count, n)


def example_kwargs(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """The keyword inputs of ``model`` for token ids [B, n]: the ids, an all-ones attention mask and
    zero token types where the forward takes them, the same ids as an encoder-decoder's decoder
    input, ``use_cache=False`` where it has that flag."""
    names = token_inputs(model)
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
              "decoder_input_ids": ids}
    kwargs = {name: values[name] for name in names}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def random_ids(model: torch.nn.Module, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """[batch, n] token ids drawn from the model's vocabulary (a capture's values do not matter):
    the rows of its input embeddings, else its (text) configuration's ``vocab_size`` (a
    vision-language model's own configuration may have none, or a default another size)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        vocab = getattr(config, "vocab_size", None) or getattr(model.config, "vocab_size", None) or 100
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@dataclass
class Captured:
    """What :func:`capture_saved_model` did."""

    program: torch.export.ExportedProgram
    sites: list  # AttentionSite
    description: str
    example: str  # "2 windows of 512 tokens of notes.txt" / "random token ids, 2 × 512"
    samples: int  # calibration samples written


def capture_saved_model(path: str | os.PathLike, output: str | os.PathLike, *, tokens: int = 512, batch: int = 2,
                        text: str | os.PathLike | None = None, samples: int = 0,
                        samples_output: str | os.PathLike | None = None, attn_implementation: str = "auto",
                        dtype: str = "float32", experts_implementation: str | None = None,
                        progress=None) -> Captured:
    """Load the model saved at ``path``, capture it on an example of ``batch`` × ``tokens`` token
    ids (windows of ``text``'s tokens when given, else random ids) and save the program to
    ``output`` (``save_program``, atomically); with ``samples``, also write that many windows of
    ``text`` (one sequence each, keyword dicts of the model's inputs) to ``samples_output`` with
    ``torch.save``, atomically: what ``calibrate --data`` reads. ``progress(message)``: called
    before each step."""
    from .api import find_attention, save_program
    from .capture import capture
    from .config import atomic_write, check_outputs

    say = progress or (lambda message: None)
    _check_count("--tokens", tokens, 2)
    _check_count("--batch", batch, 1)
    _check_count("--samples", samples, 0)
    if samples and (not text or not samples_output):
        raise ValueError("--samples needs --text (the samples are windows of its tokens) and --samples-output")
    if samples_output and not samples:
        raise ValueError("--samples-output needs --samples N")
    check_outputs([path, text], [output] + ([samples_output] if samples else []))  # before the work
    content = _read_text(text, "--text") if text else None
    say(f"loading {path}")
    saved = load_saved_model(path, attn_implementation, dtype, experts_implementation)
    if is_image_model(saved.model):
        if text or samples:
            raise ValueError(f"{type(saved.model).__name__} is an image model: --text and --samples are for text "
                             "models (write an image model's calibration samples with its image processor in Python)")
        pixels, example = random_pixels(saved.model, batch)
        inputs = {"pixel_values": pixels}
    else:
        token_inputs(saved.model)  # a text model, before the work
        if "pixel_values" in inspect.signature(saved.model.forward).parameters:
            warnings.warn(f"{type(saved.model).__name__} also takes images (pixel_values), which the command line does "
                          "not give it: the program runs its text alone; capture it with images through the Python "
                          "API (mta_rewrite.capture, then save_program)", stacklevel=2)
        longest = getattr(saved.model.config, "max_position_embeddings", None)
        if isinstance(longest, int) and tokens > longest:
            warnings.warn(f"--tokens {tokens} is more than the model's max_position_embeddings ({longest}): a model "
                          "with learned positions fails beyond it", stacklevel=2)
        if content is not None:
            if saved.tokenizer is None:
                raise ValueError(f"{path} has no tokenizer saved beside it: --text needs one (without --text the "
                                 "example is random token ids)")
            windows = text_windows(saved.tokenizer, content, tokens, max(batch, samples))
            ids, example = windows[:batch], f"{batch} window(s) of {tokens} tokens of {text}"
        else:
            ids, example = random_ids(saved.model, batch, tokens), f"random token ids, {batch} × {tokens}"
        inputs = example_kwargs(saved.model, ids)
    say(f"capturing {saved.description}")
    program = capture(saved.model, (), inputs)
    sites = find_attention(program)
    say(f"saving {output}")
    save_program(program, output)
    if samples:
        rows = [{k: v for k, v in example_kwargs(saved.model, w[None]).items() if isinstance(v, torch.Tensor)}
                for w in windows[:samples]]
        atomic_write(samples_output, lambda tmp: torch.save(rows, tmp))
    return Captured(program, sites, saved.description, example, samples)


@dataclass
class Generated:
    """What :func:`generate_saved_model` did."""

    description: str
    prompt_tokens: int
    text: str  # the generated continuation, decoded
    tokens: list[int]
    seconds: float  # generate with MTA on the prompt
    original_seconds: float | None = None  # the same generate with the model's own attention (compare=True)
    same_tokens: int | None = None  # generated tokens equal to the original's before the first difference
    decoding_layers: tuple[int, int] | None = None  # decode=True: (layers decoded through MTA, layers)


def generate_saved_model(path: str | os.PathLike, prompt: str | os.PathLike, *, new_tokens: int = 32,
                         tokens: int | None = None, config=None, plan=None, boundaries=None, compare: bool = False,
                         attn_implementation: str = "auto", dtype: str = "float32", prefill_chunk: int | None = None,
                         decode: bool = False, progress=None) -> Generated:
    """Load the language model saved at ``path``, tokenize the text file ``prompt`` (its first
    ``tokens`` tokens, or all of it) by its tokenizer and greedily generate ``new_tokens`` after
    it with :func:`interface.use_mta` (``config`` for every layer or ``plan``; ``boundaries``, or
    the plan's: boundary chunks on the prompt): MTA on the prompt, exact decoding over the cache
    (``decode``: MTA decoding too, each new token over its window and the chunk summaries kept
    with the cache). ``compare``: the original model first, timed the same way, and how many generated tokens
    agree (one timing each, after a one-token warm-up; the benchmark,
    ``benchmarks/bench_generate.py``, takes the best of several). ``prefill_chunk``: the prompt
    prefilled in pieces of that many tokens (``generate``'s ``prefill_chunk_size``; each piece after
    the first a prompt continued over the cache). ``progress(message)``: called before each step."""
    import time

    from .interface import decoding_layers, use_mta

    say = progress or (lambda message: None)
    _check_count("--max-new-tokens", new_tokens, 1)
    _check_count("--tokens", tokens, 2)
    _check_count("--prefill-chunk", prefill_chunk, 1)
    content = _read_text(prompt, "--prompt")
    say(f"loading {path}")
    saved = load_saved_model(path, attn_implementation, dtype)
    model = saved.model
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(f"{type(model).__name__} does not generate text (transformers' can_generate() is false): "
                         "generate takes a language model")
    if saved.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer saved beside it: generate needs one for the prompt and the output")
    ids = saved.tokenizer(content, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"]
    if tokens is not None:
        if ids.shape[1] < tokens:
            raise ValueError(f"the prompt has {ids.shape[1]} tokens, fewer than --tokens {tokens}")
        ids = ids[:, :tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"the prompt has {ids.shape[1]} token(s): give a longer text")
    pad = saved.tokenizer.pad_token_id if saved.tokenizer.pad_token_id is not None else saved.tokenizer.eos_token_id
    call = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad if pad is not None else 0, prefill_chunk_size=prefill_chunk)

    def timed():
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, return_dict_in_generate=True, **call)
        return out, time.perf_counter() - start

    own = model.config._attn_implementation
    use_mta(model, config=config, plan=plan, boundaries=boundaries, decode=decode)  # (its errors before any generation)
    with torch.no_grad():  # one-time costs (first calls, allocations) out of the timings
        model.generate(ids[:, :8], attention_mask=call["attention_mask"][:, :8], max_new_tokens=1,
                       pad_token_id=call["pad_token_id"])
    original = original_seconds = None
    if compare:
        model.set_attn_implementation(own)
        say(f"generating {new_tokens} tokens with the original model")
        output, original_seconds = timed()
        original = output.sequences[0, ids.shape[1]:].tolist()
        use_mta(model, config=config, plan=plan, boundaries=boundaries, decode=decode)
    say(f"generating {new_tokens} tokens with MTA on the prompt" + (" and in decoding" if decode else ""))
    output, seconds = timed()
    out = output.sequences[0, ids.shape[1]:].tolist()
    same = None if original is None else next((i for i, (a, b) in enumerate(zip(original, out)) if a != b), len(out))
    return Generated(saved.description, ids.shape[1], saved.tokenizer.decode(out), out, seconds, original_seconds, same,
                     decoding_layers(output) if decode else None)
