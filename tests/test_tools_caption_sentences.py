"""`python -m trainer caption --model blip / florence2`: a sentence per picture from a transformers model,
loaded from a folder or the (faked) hub's cache as users' runs load Salesforce/blip-image-captioning-large.

The tiny models have random weights; BLIP's output layer is biased towards one word and Florence-2 may write
only one letter, so what each writes is known: that word, as many times as --max_length lets it."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from trainer.errors import ConfigError
from trainer.tools import caption, caption_sentences

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "park"]


def write_blip(folder, word: str = "cat"):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, bos_token="[DEC]")
    text = dict(vocab_size=len(WORDS), hidden_size=32, encoder_hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[WORDS.index(word)] = 100.0
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def write_florence(folder, letter: str = "c"):
    """A Florence-2 in transformers' own format (byte-level BART tokenizer, a two-stage DaViT) that may only
    write `letter`."""
    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from trainer.models.tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    vocab["<image>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                  window_size=2, projection_dim=32, max_position_embeddings=8)
    text = dict(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
                bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=vocab["<image>"]))
    model.generation_config.forced_eos_token_id = None
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i != vocab[letter]]
    model.save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = 17  # the 4x4 feature map and its pooled token
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return write_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected hub call: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def photos(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (48, 40), (40 * i, 120, 200)).save(folder / f"{name}.jpg")
    return folder


def read(path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("search", [["--beam_search", "--num_beams", "2"], ["--top_p", "0.9"]], ids=["beam", "sample"])
def test_a_sentence_per_photo(tmp_path, blip_dir, search, capsys):
    folder = photos(tmp_path / "img", "a", "b", "c")
    assert caption.main([str(folder), "--model", "blip", "--model_dir", str(blip_dir), "--batch_size", "2",
                         "--max_length", "5", "--min_length", "2", "--trigger", "mychar", *search]) == 0
    assert [read(folder / f"{n}.txt") for n in "abc"] == ["mychar, cat cat cat cat\n"] * 3
    assert "3 captions written (.txt), 0 skipped, 0 failed" in capsys.readouterr().out


def test_kept_captions_and_the_extension(tmp_path, blip_dir):
    folder = photos(tmp_path / "img", "mine", "new")
    (folder / "mine.caption").write_text("a photo of my dog\n", encoding="utf-8")
    assert caption.main([str(folder), "--model", "blip", "--model_dir", str(blip_dir), "--caption_extension",
                         ".caption", "--max_length", "3", "--min_length", "1"]) == 0
    assert read(folder / "mine.caption") == "a photo of my dog\n"
    assert read(folder / "new.caption") == "cat cat\n"


def test_the_hub_copy_is_fetched_once_with_the_processor_files(tmp_path, blip_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def hub(repo_id, allow_patterns=None, local_files_only=False, force_download=False, local_dir=None, **kw):
        target = tmp_path / "cache" / repo_id.replace("/", "--")
        if local_files_only and not target.is_dir():
            raise LocalEntryNotFoundError("not cached")
        if not local_files_only:
            calls.append(sorted(allow_patterns))
            shutil.copytree(blip_dir, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = photos(tmp_path / "img", "a")
    for _ in range(2):
        assert caption.main([str(folder), "--model", "blip", "--overwrite", "--max_length", "3",
                             "--min_length", "1"]) == 0
    assert calls == [sorted([*caption_sentences.BLIP.files, *caption_sentences.BLIP.patterns])]
    assert read(folder / "a.txt") == "cat cat\n"


def test_a_folder_that_is_no_blip_model_is_named(tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}", encoding="utf-8")
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a blip model"):
        caption.main([str(photos(tmp_path / "img", "a")), "--model", "blip", "--model_dir", str(model_dir)])


@pytest.mark.parametrize("task", ["more_detailed_caption", "<CAPTION>"])
def test_florence2_writes_what_its_task_asks(tmp_path, task, capsys):
    model_dir = write_florence(tmp_path / "florence")
    folder = photos(tmp_path / "img", "a", "b")
    assert caption.main([str(folder), "--model", "florence2", "--model_dir", str(model_dir), "--task", task,
                         "--beam_search", "--num_beams", "2", "--max_length", "5", "--min_length", "1",
                         "--batch_size", "2"]) == 0
    assert [read(folder / f"{n}.txt") for n in "ab"] == ["cccc\n"] * 2
    assert "2 captions written" in capsys.readouterr().out


def test_florence2_task_names_are_checked(tmp_path, capsys):
    folder = str(photos(tmp_path / "img", "a"))
    assert caption.job_from_args([folder, "--task", "more_detailed_caption"]).sentence_rules.task == \
        "<MORE_DETAILED_CAPTION>"
    assert caption.job_from_args([folder]).sentence_rules.task == "<DETAILED_CAPTION>"
    with pytest.raises(SystemExit):
        caption.main([folder, "--model", "florence2", "--task", "OD"])  # not a caption task
    assert "invalid choice" in capsys.readouterr().err
