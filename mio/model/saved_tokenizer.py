"""The saved tokenizer is the trained tokenizer: saving it so that a vanilla ``AutoTokenizer`` load of
the folder splits text exactly as the in-memory tokenizer a stage trains with, checking that once when
a backbone is extended, and checking folders that already exist (``mio inspect MODEL_DIR``).

Why saving needs help (transformers 5.25): a tokenizer class with its own ``__init__`` (LlamaTokenizer,
GPT2Tokenizer, Qwen2Tokenizer, ...) rebuilds its normalizer, pre-tokenizer and decoder from its init
arguments when loaded, taking only the vocabulary, merges and post-processor from ``tokenizer.json``.
``save_pretrained`` writes to ``tokenizer_config.json`` only the arguments that reached the base class
(``init_kwargs``); LlamaTokenizer keeps ``legacy`` to itself, so a Llama-2 tokenizer loaded with
``legacy: true`` (Metaspace ``prepend_scheme="always"``: text after an added token gains "▁") reloads
with ``legacy=False`` (``"first"``): ``<|im_start|>system`` trains as ``▁system``, reloads as ``system``.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from mio.segments import Text, text_form
from mio.templates import Turn, render_chat
from mio.vocab import VOCAB_FILE, VocabTable, folder_table, is_extended

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
# What follows each added token in the probe set (one text per token: the token before each of these):
# no space, a space, a newline (a SentencePiece tokenizer's legacy setting decides whether the first gains "▁").
FOLLOWERS = ("next", " next", "\nnext")
NON_ASCII = "über café naïve 東京の猫 데이터 привет 🚀 ½ — “quoted”"
# The backend parts that decide the ids (the decoder only shapes decoded text).
BACKEND_PARTS = ("normalizer", "pre_tokenizer", "post_processor")
Encode = Callable[[list[str]], list[list[int]]]


class TokenizerDriftError(ValueError):
    """A saved tokenizer folder that loads as a tokenizer splitting text differently from the one it was saved from."""


def kept_settings(tokenizer: Any) -> dict[str, bool | int | float | str]:
    """The settings ``tokenizer_config.json`` must hold for a reload to split text as ``tokenizer`` does:
    each argument of its class's own ``__init__`` that it keeps as an attribute (``legacy``,
    ``add_prefix_space``...; vocabularies, file names and special tokens, which save_pretrained writes,
    aside). Not ``add_bos_token`` / ``add_eos_token``: where a tokenizer.json exists, transformers
    ignores them on load and takes their effect from the post-processor saved in it (compared by
    :func:`tokenization_settings`)."""
    params = list(inspect.signature(type(tokenizer).__init__).parameters.values())[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in ("vocab", "merges", *getattr(tokenizer, "vocab_files_names", {}))
             and not p.name.endswith("_token")]
    values = {n: getattr(tokenizer, n, None) for n in names}
    return {n: v for n, v in values.items() if isinstance(v, (bool, int, float, str))}


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained``, then the :func:`kept_settings` it did not write added to tokenizer_config.json
    (what it wrote stays as written)."""
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    config_file = out / TOKENIZER_CONFIG
    config = json.loads(config_file.read_text())
    missing = {k: v for k, v in kept_settings(tokenizer).items() if k not in config}
    if missing:
        config_file.write_text(json.dumps({**config, **missing}, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return out


def probe_texts(tokenizer: Any, table: VocabTable) -> list[str]:
    """The fixed probe set: ChatML turns (training's and a generation prompt's), non-ASCII text, and
    text right after each added token with and without a leading space or newline."""
    turns = [Turn("system", [Text("You are a helpful assistant.")]), Turn("user", [Text(f"hello {NON_ASCII}")]),
             Turn("assistant", [Text("hi there\n\nsecond paragraph")])]
    chats = [text_form(render_chat(turns), table), text_form(render_chat(turns[:2], add_generation_prompt=True), table)]
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])  # (token, id)
    return [*chats, NON_ASCII, f" {NON_ASCII}", f"\n{NON_ASCII}", *("".join(t + f for f in FOLLOWERS) for t, _ in added)]


def tokenization_settings(tokenizer: Any) -> dict[str, Any]:
    """What decides a tokenizer's ids, for naming a difference: its kept settings and its backend's parts."""
    out: dict[str, Any] = dict(kept_settings(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        out.update(backend_parts(json.loads(backend.to_str())))
    return out


def backend_parts(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    return {part: tokenizer_json.get(part) for part in BACKEND_PARTS}


def setting_differences(trained: dict[str, Any], reloaded: dict[str, Any]) -> list[str]:
    """One line per setting whose value differs (a setting one side lacks counts as unset there)."""
    return [f"{name}: {_show(trained.get(name))} when trained, {_show(reloaded.get(name))} when reloaded"
            for name in sorted(set(trained) | set(reloaded)) if trained.get(name) != reloaded.get(name)]


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, ensure_ascii=False)


def first_difference(texts: Sequence[str], trained: Encode, reloaded: Encode, tokenizer: Any) -> tuple[int, str]:
    """(how many probe texts encode differently, the shortest of them shown as both token lists)."""
    a, b = trained(list(texts)), reloaded(list(texts))
    differ = [i for i in range(len(texts)) if a[i] != b[i]]
    if not differ:
        return 0, ""
    i = min(differ, key=lambda k: len(texts[k]))
    show = tokenizer.convert_ids_to_tokens
    return len(differ), f"{texts[i]!r} trains as {show(a[i])} but reloads as {show(b[i])}"


def encoder(tokenizer: Any) -> Encode:
    """The ids ``tokenizer(text)`` gives, batched: through an unpadded copy of its `tokenizers` backend
    when it has one (the call's Python overhead is most of the time on short texts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return lambda texts: tokenizer(texts)["input_ids"]
    return backend_encoder(json.loads(backend.to_str()))


def backend_encoder(tokenizer_json: dict[str, Any]) -> Encode:
    """A `tokenizers` backend built from its JSON, without the padding or truncation it may carry."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(tokenizer_json))
    backend.no_padding()
    backend.no_truncation()
    return lambda texts: [e.ids for e in backend.encode_batch(texts)]


def check_round_trip(tokenizer: Any, table: VocabTable, where: str | os.PathLike) -> None:
    """Save ``tokenizer`` as a stage's folder does, load it back with vanilla ``AutoTokenizer``, and
    raise :class:`TokenizerDriftError` naming the setting when the probe set tokenizes differently
    or a setting that decides tokenization changed on the way."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mio-tokenizer-") as tmp:
        save_tokenizer(tokenizer, tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    texts = probe_texts(tokenizer, table)
    count, example = first_difference(texts, encoder(tokenizer), encoder(reloaded), tokenizer)
    settings = setting_differences(tokenization_settings(tokenizer), tokenization_settings(reloaded))
    if count or settings:
        import transformers

        said = f"{count} of {len(texts)} probe texts tokenize differently, e.g. {example}" if count else \
            f"the {len(texts)} probe texts agree"
        raise TokenizerDriftError(
            f"{where}: saved with save_pretrained and loaded back with AutoTokenizer (transformers "
            f"{transformers.__version__}), the extended tokenizer is not the one this stage would train with: {said}; "
            f"settings that differ: {'; '.join(settings) or 'none found'}. Every later stage, `mio generate` and "
            f"any serving stack would read ids this stage never trained on: state the setting in the backbone's "
            f"{TOKENIZER_CONFIG}, or report it to mio (mio.model.saved_tokenizer.kept_settings misses it)")


def folder_report(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(report lines, problems) for a model folder: does its tokenizer, as vanilla ``AutoTokenizer``
    loads it, agree with its ``mio_vocab.json`` and tokenize as the tokenizer that wrote its
    ``tokenizer.json`` (the pipeline the stage that saved it trained with)? For folders saved before
    mio kept the settings; a text-only backbone's tokenization is checked the same way."""
    from transformers import AutoTokenizer

    path = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted(kept_settings(tokenizer).items())) or "none"
    lines = [f"model folder {path}",
             f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens; settings its class rebuilds from: {settings}"]
    problems: list[str] = []
    table = folder_table(path, tokenizer, extend=True)
    if (path / VOCAB_FILE).is_file():
        problems += vocab_problems(tokenizer, table, path)
        lines.append(f"{VOCAB_FILE}: text {table.text_size} + {table.num_added} added = {table.total_size} tokens")
    else:
        lines.append(f"no {VOCAB_FILE}: " + ("an extended tokenizer (MIO's release layout)" if is_extended(tokenizer)
                                             else "a text-only backbone"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not (path / TOKENIZER_JSON).is_file() or backend is None:
        lines.append(f"tokenization: not checked (no {TOKENIZER_JSON}, or a tokenizer without a `tokenizers` "
                     "backend: the pipeline the folder was saved with is not recorded)")
        return lines, problems
    saved_json = json.loads((path / TOKENIZER_JSON).read_text())
    trained = backend_encoder(saved_json)  # the backend exactly as the training tokenizer saved it
    texts = probe_texts(tokenizer, table)
    count, example = first_difference(texts, trained, encoder(tokenizer), tokenizer)
    parts = setting_differences(backend_parts(saved_json), backend_parts(json.loads(backend.to_str())))
    if count or parts:
        fix = repairing_setting(path, tokenizer, texts, trained)
        said = [f"{count} of {len(texts)} probe texts tokenize differently from the saved {TOKENIZER_JSON}"
                + (f", e.g. {example}" if count else ""), *parts]
        if fix:
            said.append(f"loaded with {fix}, it agrees: add that setting to {path / TOKENIZER_CONFIG}")
        problems.append("; ".join(said))
    else:
        lines.append(f"tokenization: {len(texts)} probe texts agree with the saved {TOKENIZER_JSON}")
    return lines, problems


def vocab_problems(tokenizer: Any, table: VocabTable, folder: Path) -> list[str]:
    """Whether the tokenizer holds the table's added tokens at the table's ids, and the model its rows."""
    names = table.added_tokens()
    got = tokenizer.convert_tokens_to_ids(names)
    wrong = [(n, i, table.text_size + k) for k, (n, i) in enumerate(zip(names, got)) if i != table.text_size + k]
    problems = [(f"{len(wrong)} of {len(names)} added tokens are not at the ids {VOCAB_FILE} gives, e.g. "
                 f"{wrong[0][0]} at {wrong[0][1]}, not {wrong[0][2]}")] if wrong else []
    config_file = folder / "config.json"
    rows = json.loads(config_file.read_text()).get("vocab_size") if config_file.is_file() else None
    if isinstance(rows, int) and rows < table.total_size:
        problems.append(f"config.json's vocab_size {rows} is smaller than the table's {table.total_size} tokens")
    return problems


def repairing_setting(folder: Path, tokenizer: Any, texts: list[str], trained: Encode) -> str | None:
    """A boolean kept setting that, flipped at load time, makes the folder tokenize as trained
    (``legacy=True`` for a Llama-2 folder saved before mio kept it), as ``name=value``; else None."""
    from transformers import AutoTokenizer

    for name, value in kept_settings(tokenizer).items():
        if not isinstance(value, bool):
            continue
        flipped = AutoTokenizer.from_pretrained(folder, local_files_only=True, **{name: not value})
        if first_difference(texts, trained, encoder(flipped), flipped)[0] == 0:
            return f"{name}={not value}"
    return None
