"""Inference from checkpoints: mmdit.inference, infer.py (subprocess) and src/infer_loop.ipynb (nbclient).

Checkpoints are built here: tiny random-weight text encoders (+ the 16-channel tiny VAE) from
mmdit.encoders.tiny, a depth-2 / width-64 / 4-head MMDiT with perturbed (non-zero) weights, saved by
save_checkpoint in the trainer's layout. One VAE checkpoint (pixel step 16) and one pixel-space one (step 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.config import Config, ModelConfig, SampleConfig
from mmdit.encoders import tiny
from mmdit.inference import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ImageSizeError,
    Pipeline,
    image_filename,
    nearest_multiple,
    save_gif,
)
from mmdit.model import MMDiT
from mmdit.sampling import sample_noise
from mmdit.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "src" / "infer_loop.ipynb"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("MMDIT_CHECKPOINT", None)
    return env


def make_checkpoint(run_dir: Path, dirs: dict, vae: bool, step: int = 10, seed: int = 0) -> Path:
    cfg = Config(
        model=ModelConfig(depth=2, hidden_size=64, num_heads=4, max_res=64 if vae else 32,
                          max_res_orig=64 if vae else 32, **tiny.tiny_model_dims(vae)),
        encoders=tiny.tiny_encoders_config(dirs, vae=vae, max_length=8),
        sample=SampleConfig(num_steps=4, cfg_scale=3.0),
    )
    torch.manual_seed(seed)
    model = MMDiT(cfg.model)
    with torch.no_grad():  # zero-initialised gates/output would make every prediction 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    return save_checkpoint(
        run_dir, step, model_state=state, ema_state={k: 0.9 * v for k, v in state.items()}, optimizer_state=None,
        scheduler_state=None, scaler_state=None, trainer_state={}, config=cfg, keep_last=0,
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def vae_ckpt(tiny_dirs, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "vae_run", tiny_dirs, vae=True)


@pytest.fixture(scope="module")
def pixel_ckpt(tiny_dirs, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "pixel_run", tiny_dirs, vae=False)


@pytest.fixture(scope="module")
def pixel_pipe(pixel_ckpt) -> Pipeline:
    return Pipeline.from_checkpoint(pixel_ckpt.parent)  # the run dir: newest checkpoint


def run_infer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=300,
    )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------------------------------
# infer.py


def test_cli_pngs_gif_and_seed(vae_ckpt, tmp_path):
    common = ["--checkpoint", str(vae_ckpt.parent), "--prompt", "a red circle", "--prompt", "two blue squares",
              "--width", "48", "--height", "32", "--num_steps", "3", "--cfg_scale", "4", "--batch_size", "2"]
    r = run_infer(*common, "--seed", "11", "--gif", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == [image_filename("a red circle", 11), image_filename("two blue squares", 12)]
    assert all(Image.open(p).size == (48, 32) for p in pngs)
    assert Image.open(pngs[0]).text["prompt"] == "a red circle"  # settings travel in the PNG
    gifs = sorted((tmp_path / "a").glob("*.gif"))
    assert len(gifs) == 2
    for g in gifs:
        with Image.open(g) as im:
            assert im.n_frames == 3 and im.size == (48, 32)
    assert str(pngs[0]) in r.stdout and "seed 11" in r.stdout

    # the same seed (without --gif, and from another folder) gives identical images
    r2 = run_infer(*common, "--seed", "11", "--out", str(tmp_path / "b"), cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    for p in pngs:
        assert np.array_equal(pixels(p), pixels(tmp_path / "b" / p.name))
    assert not list((tmp_path / "b").glob("*.gif"))


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_cli_bad_size_names_nearest_valid(vae_ckpt, tmp_path):
    msg = _one_line_error(run_infer("--checkpoint", str(vae_ckpt), "--prompt", "x", "--width", "100",
                                    "--height", "64", cwd=tmp_path))
    assert "100x64" in msg and "multiples of 16" in msg and "nearest valid size: 96x64" in msg


def test_cli_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_run"
    msg = _one_line_error(run_infer("--checkpoint", str(missing), "--prompt", "x", cwd=tmp_path))
    assert str(missing) in msg and "not found" in msg


def test_cli_config_does_not_match_weights(vae_ckpt, tmp_path):
    bad = tmp_path / "bad_run" / vae_ckpt.name
    shutil.copytree(vae_ckpt, bad)
    cfg_file = bad / "config.yaml"
    text = cfg_file.read_text()
    assert "  depth: 2\n" in text
    cfg_file.write_text(text.replace("  depth: 2\n", "  depth: 3\n"))
    msg = _one_line_error(run_infer("--checkpoint", str(bad), "--prompt", "x", "--width", "32", "--height", "32",
                                    cwd=tmp_path))
    assert "do not match its config" in msg and "model.depth=3" in msg and "blocks.2.*" in msg, msg
    assert "depth=2" in msg  # what the weights look like


# ----------------------------------------------------------------------------------------------------
# the library


def test_checkpoint_errors(pixel_ckpt, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Pipeline.from_checkpoint(tmp_path / "nothing")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no complete step_<N>"):
        Pipeline.from_checkpoint(empty)
    no_ema = tmp_path / "run" / pixel_ckpt.name
    shutil.copytree(pixel_ckpt, no_ema)
    (no_ema / "ema.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"ema\.safetensors.*weights='model'"):
        Pipeline.from_checkpoint(no_ema)
    # a wider model in the config: shape mismatches, one error
    cfg_file = no_ema / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("  hidden_size: 64\n", "  hidden_size: 128\n"))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for .*hidden_size=64"):
        Pipeline.from_checkpoint(no_ema, weights="model")


def test_run_dir_picks_newest_complete(pixel_ckpt, tiny_dirs, tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_dirs, vae=False, step=5)
    newest = make_checkpoint(run, tiny_dirs, vae=False, step=20, seed=1)
    (run / "step_00000030").mkdir()  # an interrupted save: no COMPLETE marker, no files
    pipe = Pipeline.from_checkpoint(run, weights="model")
    assert pipe.step_dir == newest and pipe.step == 20


def test_seeds_reproduce(pixel_pipe):
    kw = dict(width=16, height=8, num_steps=3, cfg_scale=2.0)
    a = pixel_pipe.generate(["a red circle", "a green star"], seed=5, **kw)
    b = pixel_pipe.generate(["a red circle", "a green star"], seed=5, **kw)
    c = pixel_pipe.generate(["a red circle", "a green star"], seed=6, **kw)
    assert [im.info["seed"] for im in a] == [5, 6]
    for x, y, z in zip(a, b, c):
        assert x.size == (16, 8)
        assert np.array_equal(np.asarray(x), np.asarray(y))
        assert not np.array_equal(np.asarray(x), np.asarray(z))
    # an image's own seed reproduces it as the first image of a call
    again = pixel_pipe.generate(["a green star"], seed=6, **kw)[0]
    assert np.abs(np.asarray(again).astype(int) - np.asarray(a[1]).astype(int)).max() <= 1  # batch 2 vs 1
    # random seed: reported
    r = pixel_pipe.generate("a red circle", seed=-1, **kw)
    assert r[0].info["seed"] == pixel_pipe.last_seed >= 0


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_stochastic"])
def test_frames_one_per_step(pixel_pipe, sampler, tmp_path):
    calls = []
    images, frames = pixel_pipe.generate(["a", "b"], width=8, height=8, num_steps=4, sampler=sampler, seed=1,
                                         return_frames=True, callback=lambda i, t, x: calls.append((i, t)))
    assert len(frames) == 2 and all(len(f) == 4 for f in frames)
    assert [i for i, _ in calls] == [0, 1, 2, 3] and calls[-1][1] == 0.0  # the user's callback still runs
    for im, f in zip(images, frames):
        assert np.array_equal(np.asarray(im), np.asarray(f[-1]))  # the last frame is the final image
        assert not np.array_equal(np.asarray(f[0]), np.asarray(f[-1]))
    plain = pixel_pipe.generate(["a", "b"], width=8, height=8, num_steps=4, sampler=sampler, seed=1)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, plain))
    _, states = pixel_pipe.generate("a", width=8, height=8, num_steps=4, sampler=sampler, seed=1,
                                    return_frames=True, frame_mode="state")
    assert len(states[0]) == 4
    g = save_gif(frames[0], tmp_path / "f.gif", duration_ms=50)
    with Image.open(g) as im:
        assert im.n_frames == 4


def test_pixel_space_sizes(pixel_pipe):
    assert pixel_pipe.cfg.model.pixel_step == 2
    with pytest.raises(ImageSizeError, match="nearest valid size: 10x8"):
        pixel_pipe.generate("x", width=9, height=8, num_steps=1)
    with pytest.warns(UserWarning, match="max_res=32"):
        pixel_pipe.generate("x", width=34, height=8, num_steps=1, seed=0)
    assert nearest_multiple(100, 16) == 96 and nearest_multiple(104, 16) == 112 and nearest_multiple(3, 16) == 16


def test_bf16_keeps_time_scale_fp32(pixel_ckpt):
    pipe = Pipeline.from_checkpoint(pixel_ckpt, device="cpu", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    assert pipe.model.condition.time.time_scale.dtype == torch.float32
    (im,) = pipe.generate("a red circle", width=8, height=8, num_steps=2, seed=0)
    assert im.size == (8, 8)


# ----------------------------------------------------------------------------------------------------
# the notebook


def test_notebook_runs_headless(vae_ckpt, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    out = tmp_path / "nb_out"
    # papermill style: the injected values follow (and override) the defaults of the parameters cell
    nb.cells[0].source += "\n" + "\n".join([
        f"loadDir = {str(vae_ckpt.parent)!r}",
        'device = "cpu"',
        "batch_size = 2",
        "num_steps = 2",
        'text_input = "a small red circle"',
        "width = 32",
        "height = 16",
        "seed = 3",
        f"out_dir = {str(out)!r}",
    ])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "src")}})
    client.execute(env=_env())  # passed on to the kernel manager: the kernel gets OMP_NUM_THREADS=1 etc.
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [image_filename("a small red circle", s) for s in (3, 4)]
    assert Image.open(pngs[0]).size == (32, 16)
    outputs = nb.cells[2].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("seed 3" in o.get("text", "") for o in outputs)


def test_inference_uses_the_shift_rule(pixel_ckpt):
    """sample.shift null: the rule at the size sampled (base 64 tokens = 16 px here); explicit shift wins."""
    pipe = Pipeline.from_checkpoint(pixel_ckpt, device="cpu")
    pipe.cfg.flow.shift_base_tokens = 64  # 16 x 16 px = 8 x 8 patches of 2 px
    assert pipe.cfg.sample.shift is None
    (small,) = pipe.generate("a red circle", width=16, height=16, num_steps=2, seed=0)
    (big,) = pipe.generate("a red circle", width=32, height=32, num_steps=2, seed=0)
    assert small.info["shift"] == 1.0 and big.info["shift"] == 2.0
    (forced,) = pipe.generate("a red circle", width=32, height=32, num_steps=2, seed=0, shift=1.0)
    assert forced.info["shift"] == 1.0 and not np.array_equal(np.asarray(big), np.asarray(forced))


def test_autocast_over_fp32_weights_vs_bf16_weights(pixel_ckpt):
    """Default: fp32 weights under autocast (training's numerics); bf16 weights are the opt-in memory saver.

    Both stay within a bound derived from bf16's unit roundoff u = 2^-8, on every CPU and thread count
    (which of the two lands closer to fp32 is a coin flip that depends on the CPU's kernels, so it is not
    asserted). A velocity passes through 4 * depth + 2 chained bf16 matmuls (patch embedding; per block qkv,
    output projection and the two MLP matrices; adaLN; the output layer), each rounding its inputs to
    relative error u: worst case, errors add linearly, so |dv| <= (4 depth + 2) u |v|. A sample integrates
    guided velocities over t from 1 to 0 (sum |dt| = 1), and v_u + s (v_c - v_u) amplifies errors by at most
    1 + 2 s. Recorded (this tiny checkpoint, CPU, 4 euler steps, CFG 3, 16x16 px): velocity errors ~1.5 u,
    mean |sample difference| ~2.4e-3 for both, against bounds of 10 u and ~0.07.
    """
    from mmdit.sampling import sample

    prompts = ["a red circle", "a green star", "a blue square", "a small white ring"]
    u, cfg_scale = 2.0**-8, 3.0
    noise = sample_noise((len(prompts), 3, 16, 16), torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 0.6)

    def run(**load) -> tuple[Pipeline, torch.Tensor, torch.Tensor]:
        pipe = Pipeline.from_checkpoint(pixel_ckpt, device="cpu", **load)
        cond = pipe.encode(prompts)
        return pipe, pipe.velocity(noise, t, cond), sample(pipe.velocity, noise, cond, num_steps=4,
                                                           cfg_scale=cfg_scale)

    ref_pipe, v_ref, x_ref = run()
    chained = 4 * ref_pipe.cfg.model.depth + 2
    v_bound = chained * u * v_ref.norm().item()
    x_bound = (1 + 2 * cfg_scale) * chained * u * v_ref.abs().mean().item()
    for name, load in (("autocast", {"precision": torch.bfloat16}), ("bf16 weights", {"dtype": torch.bfloat16})):
        pipe, v, x = run(**load)
        dv, dx = (v - v_ref).norm().item(), (x - x_ref).abs().mean().item()
        print(f"{name}: |dv| / |v| = {dv / v_ref.norm().item() / u:.2f} u, mean |sample difference| {dx:.2e}")
        assert 0 < dv < v_bound and 0 < dx < x_bound, (name, dv, v_bound, dx, x_bound)
        weights = {p.dtype for n, p in pipe.model.named_parameters() if not n.endswith("time_scale")}
        assert weights == ({torch.float32} if name == "autocast" else {torch.bfloat16}), name
        assert pipe.model.condition.time.time_scale.dtype == torch.float32  # t x 1000 is never rounded
    default = Pipeline.from_checkpoint(pixel_ckpt, device="cpu")
    assert default.dtype == torch.float32 and default.precision == torch.float32  # CPU: no autocast


def tiny_autoencoder_folder(path: Path, latent_channels: int) -> Path:
    """A random TAESD-family pair (``preview_encoder.pth`` / ``preview_decoder.pth``), as TAEF2 ships them."""
    from mmdit.encoders.tiny_autoencoder import TinyAutoencoder

    torch.manual_seed(1)
    net = TinyAutoencoder(latent_channels)
    path.mkdir(parents=True)
    torch.save(net.encoder.state_dict(), path / "preview_encoder.pth")
    torch.save(net.decoder.state_dict(), path / "preview_decoder.pth")
    return path


def test_preview_decoder_draws_the_intermediate_frames_only(vae_ckpt, tmp_path):
    """encoders.preview_vae (a tiny autoencoder of the same latent space) decodes the gif's intermediate frames;
    the images and the last frame still come from encoders.vae, bit for bit; another latent space is refused."""
    preview_dir = tiny_autoencoder_folder(tmp_path / "preview", latent_channels=16)
    plain = Pipeline.from_checkpoint(vae_ckpt, device="cpu")
    fast = Pipeline.from_checkpoint(vae_ckpt, device="cpu", preview_vae=str(preview_dir))
    assert plain.preview is None and fast.preview is not None
    calls = []
    decode = fast.preview.decode
    fast.preview.decode = lambda z: calls.append(z.shape) or decode(z)
    kwargs = dict(width=64, height=64, num_steps=4, seed=3, return_frames=True)
    images_a, frames_a = plain.generate(["a red circle"], **kwargs)
    images_b, frames_b = fast.generate(["a red circle"], **kwargs)
    assert len(calls) == 3 and len(frames_b[0]) == 4  # steps 1-3 previewed, the last one decoded by the VAE
    assert np.array_equal(np.asarray(images_a[0]), np.asarray(images_b[0]))
    assert np.array_equal(np.asarray(frames_a[0][-1]), np.asarray(frames_b[0][-1]))
    assert not np.array_equal(np.asarray(frames_a[0][0]), np.asarray(frames_b[0][0]))
    other = tiny_autoencoder_folder(tmp_path / "other", latent_channels=4)
    with pytest.raises(CheckpointMismatchError, match="encoders.preview_vae"):
        Pipeline.from_checkpoint(vae_ckpt, device="cpu", preview_vae=str(other))
