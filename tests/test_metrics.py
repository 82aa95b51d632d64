"""Metrics against a direct reference computation of the protocol, on tiny backbones loaded from disk."""

from __future__ import annotations

import socket

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mige_lightning import metrics as M
from tests.helpers.metric_backbones import save_tiny_backbones


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    M.load_dino.cache_clear()
    M.load_clip.cache_clear()
    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def rand_img(seed, size=(300, 200)):
    return PIL.Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def ref_resize_crop(img, resize, crop):
    """The protocol written out with PIL alone: short side → resize (torchvision's rounding), center crop."""
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), PIL.Image.BICUBIC)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def ref_tensor(img, mean, std):
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def test_non_square_inputs_are_resized_on_the_short_side_then_center_cropped():
    img = rand_img(1, (300, 200))
    ours = M.resize_center_crop(img, 256, 224)
    assert ours.size == (224, 224)
    assert np.array_equal(np.asarray(ours), np.asarray(ref_resize_crop(img, 256, 224)))
    tall = M.resize_center_crop(rand_img(2, (100, 400)), 224, 224)
    assert np.array_equal(np.asarray(tall), np.asarray(ref_resize_crop(rand_img(2, (100, 400)), 224, 224)))


def test_identical_images_give_one_and_zero(backbones):
    m = M.build_metrics(
        dino=backbones["dino"],
        clip_model=backbones["clip_model"],
        clip_pretrained=backbones["clip_pretrained"],
    )
    imgs = [rand_img(i) for i in range(3)]
    for name in ("dino", "clip_i"):
        m[name].update(imgs, imgs)
        assert abs(m[name].compute().item() - 1.0) < 1e-6
    for name in ("l1", "l2"):
        m[name].update(imgs, imgs)
        assert m[name].compute().item() == 0.0
    assert list(m) == ["dino", "clip_i", "clip_t", "clip_dir", "l1", "l2"]  # the paper's column order


def test_every_metric_equals_a_direct_reference_computation(backbones):
    m = M.build_metrics(
        dino=backbones["dino"],
        clip_model=backbones["clip_model"],
        clip_pretrained=backbones["clip_pretrained"],
    )
    outs, refs = (
        [rand_img(10 + i, (320, 240)) for i in range(3)],
        [rand_img(20 + i, (200, 260)) for i in range(3)],
    )
    in_caps, out_caps = ["a cat", "a dog", "a car"], ["a red cat", "a dog", "a blue car"]
    dino = M.load_dino(backbones["dino"]).model
    clip = M.load_clip(backbones["clip_model"], backbones["clip_pretrained"])

    def d(img):
        return dino(pixel_values=ref_tensor(ref_resize_crop(img, 256, 224), *IMAGENET)).last_hidden_state[
            0, 0
        ]

    def ci(img):
        return clip.model.encode_image(ref_tensor(ref_resize_crop(img, 224, 224), *CLIP))[0]

    def ct(text):
        return clip.model.encode_text(clip.tokenizer([text], context_length=77))[0]

    with torch.no_grad():
        exp = {
            "dino": np.mean(
                [F.cosine_similarity(d(o), d(r), dim=0).item() for o, r in zip(outs, refs, strict=True)]
            ),
            "clip_i": np.mean(
                [F.cosine_similarity(ci(o), ci(r), dim=0).item() for o, r in zip(outs, refs, strict=True)]
            ),
            "clip_t": np.mean(
                [F.cosine_similarity(ci(o), ct(c), dim=0).item() for o, c in zip(outs, out_caps, strict=True)]
            ),
        }
        dirs = []
        for src, out, a, b in zip(refs, outs, in_caps, out_caps, strict=True):
            if a == b:
                continue  # skipped: 0 / 0
            n = F.normalize
            img_dir = n(n(ci(out), dim=0) - n(ci(src), dim=0), dim=0)
            txt_dir = n(n(ct(b), dim=0) - n(ct(a), dim=0), dim=0)
            dirs.append((img_dir * txt_dir).sum().item())
        exp["clip_dir"] = np.mean(dirs)
    resized = [
        np.asarray(o.resize(r.size, PIL.Image.BICUBIC), dtype=np.float64) / 255
        for o, r in zip(outs, refs, strict=True)
    ]
    refs_px = [np.asarray(r, dtype=np.float64) / 255 for r in refs]
    exp["l1"] = np.mean([np.abs(a - b).mean() for a, b in zip(resized, refs_px, strict=True)])
    exp["l2"] = np.mean([((a - b) ** 2).mean() for a, b in zip(resized, refs_px, strict=True)])

    m["dino"].update(outs, refs)
    m["clip_i"].update(outs, refs)
    m["clip_t"].update(outs, out_caps)
    m["clip_dir"].update(refs, outs, in_caps, out_caps)
    m["l1"].update(outs, refs)
    m["l2"].update(outs, refs)
    for name, value in exp.items():
        assert abs(m[name].compute().item() - value) < 1e-5, (name, m[name].compute().item(), value)
    assert torch.isnan(m["clip_dir"].last[1]) and m["clip_dir"].count == 2  # identical captions skipped
    assert m["clip_t"].compute().item() > -1 and abs(m["dino"].compute().item()) <= 1  # raw cosine


def test_missing_backbones_disable_metrics_with_one_log_line(caplog):
    M._warned.clear()
    with caplog.at_level("WARNING"):
        m = M.build_metrics()
        M.build_metrics()  # a second metric set does not repeat the message
    assert list(m) == ["l1", "l2"]
    assert (
        caplog.text.count("DINO is disabled") == 1
        and caplog.text.count("CLIP-I / CLIP-T / CLIPdir are disabled") == 1
    )


def test_backbone_local_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.dino: local pretrained path"):
        M.load_dino(str(tmp_path / "missing"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scored(backbones, indices) -> dict:
    """All six metrics updated with the samples at ``indices`` (the same data in every process layout)."""
    m = M.build_metrics(
        dino=backbones["dino"],
        clip_model=backbones["clip_model"],
        clip_pretrained=backbones["clip_pretrained"],
    )
    idx = list(indices)
    outs, refs = [rand_img(30 + i) for i in idx], [rand_img(40 + i) for i in idx]
    caps_in, caps_out = [f"cap {i}" for i in idx], [f"cap {i}" if i == 2 else f"new {i}" for i in idx]
    m["dino"].update(outs, refs)
    m["clip_i"].update(outs, refs)
    m["clip_t"].update(outs, caps_out)
    m["clip_dir"].update(refs, outs, caps_in, caps_out)
    m["l1"].update(outs, refs)
    m["l2"].update(outs, refs)
    return m


def _worker(rank, world, port, backbones, out):
    import open_clip
    import torch.distributed as dist

    open_clip.add_model_config(backbones["clip_cfg"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    values = {k: v.compute().item() for k, v in _scored(backbones, range(rank, 6, world)).items()}  # synced
    if rank == 0:
        torch.save(values, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_in_two_gloo_processes_equal_the_single_process_values(backbones, tmp_path):
    out = str(tmp_path / "dist.pt")
    mp.spawn(_worker, args=(2, _free_port(), backbones, out), nprocs=2, join=True)
    dist_values = torch.load(out)
    for k, v in _scored(backbones, range(6)).items():
        assert abs(v.compute().item() - dist_values[k]) < 1e-6, k


def test_clip_activation_follows_the_weights_tag(backbones, monkeypatch):
    """OpenAI's CLIP weights need QuickGELU; open_clip builds plain ``ViT-B-32`` with GELU even for
    the ``openai`` tag (it only warns). ``load_clip`` must force QuickGELU there."""
    import open_clip

    assert M.force_quick_gelu("ViT-B-32", "openai") is True
    assert M.force_quick_gelu("ViT-B-32-quickgelu", "openai") is False  # the config has it already
    assert M.force_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False  # trained with GELU
    assert M.force_quick_gelu("ViT-B-32", backbones["clip_pretrained"]) is False  # a file: config decides
    assert M.DEFAULT_CLIP_MODEL == "ViT-B-32-quickgelu"
    assert open_clip.get_model_config(M.DEFAULT_CLIP_MODEL)["quick_gelu"] is True

    # what load_clip builds for the openai tag (weights not loaded: no network here)
    seen = {}
    real = open_clip.create_model

    def create(name, pretrained=None, **kwargs):
        seen.update(kwargs)
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create)
    M.load_clip.cache_clear()
    try:
        clip = M.load_clip("ViT-B-32", "openai")
    finally:
        M.load_clip.cache_clear()
    assert seen["force_quick_gelu"] is True
    acts = {type(m).__name__ for m in clip.modules() if "GELU" in type(m).__name__}
    assert acts == {"QuickGELU"}, acts
