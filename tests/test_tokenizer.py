"""Our torch-free CLIP tokenizer (mema_jax.models.tokenizer) against transformers' CLIPTokenizer on
the real CLIP vocabulary, and the JAX text-to-image pipeline running with torch and transformers
unimportable (the core install, without the [torch] extra).

The real vocabulary is OpenAI's BPE file shipped in the open-clip-torch wheel (fetched with
``pip download``, which works offline from the local index here); vocab.json and merges.txt are
built from it as OpenAI's simple tokenizer does, in the files of SD1.5's tokenizer/ folder.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_required

from mema_jax.data.layout import DISEASES, SEVERITIES
from mema_jax.models.convert_clip import load_tokenizer, tokenize
from mema_jax.models.tokenizer import CLIPTokenizer, TokenizerError

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = 49406, 49407

PROMPTS = [
    *(f"A face, eye with {disease}, {severity} level" for disease in DISEASES for severity in SEVERITIES),
    "A face, eye with TAO",
    "a photo of a cat",
    "",
    "   ",
    "  Hello\tWORLD \n\n again  ",
    "hello!!! ??? ... ,,, ;-) (x) [y] {z} \"quoted\" 'single'",
    "C++ & C# @home #tag $100 50% a_b a-b a/b a\\b ~x^y",
    "don't you'll we've I'm he'd it's ''s 'S",
    "aaaa aaaaaaa xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx 12345 3.14159 1,000,000",
    "café naïve Zürich façade e\u0301 (combining acute) q\u0303",
    "ΟΔΟΣ Σ ελληνικά İstanbul straße ﬁne ﬀ Ⅻ ½ ²",
    "日本語のテキスト 中文 한국어 русский текст עברית العربية हिन्दी",
    "🙂👍🏽 🏳️‍🌈 ❤️ ✨ 👩‍⚕️",
    "a\u00a0b\u2028c\u3000d\x1ce\x1ff\u200bg\ufeffh",
    "a <|endoftext|> b <|EndOfText|> c x<|startoftext|>y",
    "highly detailed, 8k, photorealistic, trending on artstation, by greg rutkowski, octane render",
    " ".join(["a very long prompt about a patient's eye"] * 20),
    "word " * 100,
]


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's simple_tokenizer.bytes_to_unicode, written out here (not imported from ours)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_bpe_file(tmp: Path) -> bytes:
    """open_clip/bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "open-clip-torch", "--no-deps", "-q", "-d", str(tmp)],
                            capture_output=True, text=True, timeout=300)
    wheels = sorted(tmp.glob("open_clip_torch-*.whl"))
    if not wheels:
        skip_unless_required(f"the open-clip-torch wheel (real CLIP vocabulary) is not obtainable: {result.stderr[-500:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def real_tokenizer_folder(tmp_path_factory) -> Path:
    """SD1.5's tokenizer/ folder files, with the real vocabulary (49408 tokens)."""
    merges = gzip.decompress(_clip_bpe_file(tmp_path_factory.mktemp("wheel"))).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    def token(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"),
               "unk_token": token("<|endoftext|>"), "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in special.items()},
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer"}))
    return folder


@pytest.fixture(scope="module")
def saved_by_transformers(real_tokenizer_folder, tmp_path_factory) -> Path:
    """The same tokenizer as transformers 5 saves it: tokenizer.json + tokenizer_config.json."""
    from transformers import CLIPTokenizer as HFTokenizer

    folder = tmp_path_factory.mktemp("clip_tokenizer_json")
    HFTokenizer.from_pretrained(real_tokenizer_folder).save_pretrained(folder)
    assert (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists()
    return folder


def reference_ids(folder, prompts, max_length=77) -> np.ndarray:
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(folder)
    return np.asarray(hf(list(prompts), padding="max_length", max_length=max_length, truncation=True)["input_ids"])


def test_real_vocabulary_has_the_known_ids(real_tokenizer_folder):
    tokenizer = load_tokenizer(real_tokenizer_folder)
    assert len(tokenizer.vocab) == 49408
    ids = tokenize(tokenizer, "a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0, :7], [BOS, 320, 1125, 539, 320, 2368, EOS])
    assert np.all(ids[0, 7:] == EOS)  # SD1.5 pads with <|endoftext|>


@pytest.mark.parametrize("layout", ["vocab_and_merges", "tokenizer_json"])
def test_equals_transformers_on_prompts(real_tokenizer_folder, saved_by_transformers, layout):
    folder = real_tokenizer_folder if layout == "vocab_and_merges" else saved_by_transformers
    ours = tokenize(load_tokenizer(folder), PROMPTS)
    ref = reference_ids(folder, PROMPTS)
    for prompt, a, b in zip(PROMPTS, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
    long_rows = [i for i, p in enumerate(PROMPTS) if len(load_tokenizer(folder).encode(p)) > 77]
    assert long_rows and all(ours[i, -1] == EOS and ours[i, -2] != EOS for i in long_rows)  # truncated, eos last


def test_equals_transformers_on_every_fifth_assigned_code_point(real_tokenizer_folder):
    """Character classes (letters, numbers, whitespace), NFC and lower-casing, code point by code point.
    Code points unassigned in Python's Unicode version are left out: the Rust library's tables are
    newer, and there they may be letters where Python's are not."""
    code_points = [c for c in range(0, sys.maxunicode + 1, 5)
                   if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    prompts = [f"a{chr(c)}a{chr(c)}1{chr(c)} {chr(c)}.{chr(c)}{chr(c)}" for c in code_points]
    ours = tokenize(load_tokenizer(real_tokenizer_folder), prompts)
    ref = reference_ids(real_tokenizer_folder, prompts)
    differ = [hex(c) for c, a, b in zip(code_points, ours, ref) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} code points tokenize differently: {differ[:20]}"


def test_pad_token_comes_from_the_config(real_tokenizer_folder, tmp_path):
    """SD2.x's tokenizer pads with "!" (id 0), not with <|endoftext|>."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((real_tokenizer_folder / name).read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((real_tokenizer_folder / name).read_text())
        (tmp_path / name).write_text(json.dumps({**config, "pad_token": "!"}))
    ours = tokenize(load_tokenizer(tmp_path), PROMPTS[:3], max_length=20)
    np.testing.assert_array_equal(ours, reference_ids(tmp_path, PROMPTS[:3], max_length=20))
    assert ours[0, -1] == 0


def test_added_tokens_beyond_the_special_ones_are_refused(real_tokenizer_folder, tmp_path):
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((real_tokenizer_folder / name).read_bytes())
    config = json.loads((real_tokenizer_folder / "tokenizer_config.json").read_text())
    added = {"49408": {"content": "<cat-toy>", "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False, "special": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
    with pytest.raises(TokenizerError, match="<cat-toy>"):
        CLIPTokenizer.from_folder(tmp_path)


def test_merges_with_unknown_tokens_are_an_error_naming_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="merges.txt.*'a' 'b'"):
        CLIPTokenizer.from_folder(tmp_path)


# ----------------------------------------------------------------------------------------------
# The pipeline on the core install: torch and transformers cannot be imported.

TORCH_FREE_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "torchvision", "transformers", "diffusers")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not importable here: the JAX side must run on the core install")
            return None

    sys.meta_path.insert(0, Blocker())
    sys.path.insert(0, {repo!r})
    import numpy as np
    from mema_jax.pipelines.text_to_image import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_folder({folder!r})
    images = pipe(["a photo", "b c"], num_inference_steps=1, height=32, width=32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8, (images.shape, images.dtype)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    assert "torch" not in sys.modules
    print("torch-free pipeline ok")
""")


def test_pipeline_loads_and_runs_without_torch_or_transformers(tiny_sd):
    folder = tiny_sd[0]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device is enough
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT.format(repo=str(REPO), folder=str(folder))],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "torch-free pipeline ok" in result.stdout
