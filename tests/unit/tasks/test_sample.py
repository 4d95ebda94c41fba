"""Inference: the T2V pipeline on a tiny model (every condition type), and the tasks.sample CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opensora_core.data.buckets import aspect_ratio_table
from opensora_core.data.video_io import read_video, write_image, write_video
from opensora_core.diffusion.conditions import CONDITION_TYPES
from opensora_core.diffusion.sampling import SamplingOptions
from opensora_core.errors import InputError
from opensora_core.inference import T2VPipeline, VideoSpec, prepare_reference, resolve_model
from opensora_core.outputs import SLUG_MAX, slugify
from tasks import sample as sample_task
from tests.unit.tasks._tiny_t2v import write_tiny_models

OPTS = SamplingOptions(num_steps=2, guidance=3.0, guidance_img=2.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipeline(models):
    return T2VPipeline.from_training(models["diffusion"], models["vae"], models["latent_stats"], device="cpu")


def test_pipeline_defaults_to_the_last_stage_video_bucket(pipeline) -> None:
    assert pipeline.video == VideoSpec(num_frames=9, height=32, width=32, fps=8.0)
    assert pipeline.spatial_factor == 16


def test_sample_is_the_same_alone_or_batched(pipeline) -> None:
    prompts = ["a red circle moves left", "a blue square rises"]
    both = pipeline.generate(prompts, [7, 8], OPTS, batch_size=2)
    alone = pipeline.generate(prompts[1:], [8], OPTS, batch_size=1)
    assert both[0].shape == (9, 32, 32, 3) and both[0].dtype == np.uint8
    # Same noise; only the batched matmuls' rounding may differ.
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1
    assert all(
        np.array_equal(a, b) for a, b in zip(both, pipeline.generate(prompts, [7, 8], OPTS, batch_size=2))
    )
    assert not np.array_equal(alone[0], pipeline.generate(prompts[1:], [9], OPTS)[0])


@pytest.fixture(scope="module")
def t2v_sample(pipeline) -> np.ndarray:
    return pipeline.generate(["a green triangle moves down"], [3], OPTS)[0]


@pytest.mark.parametrize("cond_type", CONDITION_TYPES)
def test_each_condition_type_end_to_end(pipeline, t2v_sample, cond_type: str) -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(9 if cond_type.startswith("v2v") else 1, 40, 48, 3), dtype=np.uint8)
    kwargs = {} if cond_type == "t2v" else {"ref": ref}
    out = pipeline.generate(["a green triangle moves down"], [3], OPTS, cond_type=cond_type, **kwargs)[0]
    assert out.shape == (9, 32, 32, 3)
    assert np.array_equal(out, t2v_sample) == (cond_type == "t2v")


def test_reference_frames_are_placed_by_condition_type() -> None:
    frames = np.stack([np.full((16, 16, 3), 20 * i, dtype=np.uint8) for i in range(5)])
    spec = VideoSpec(num_frames=9, height=16, width=16)
    value = lambda clip, t: round(float((clip[0, 0, t].mean() + 1) * 127.5))  # noqa: E731
    assert value(prepare_reference(frames, "i2v_head", spec), 8) == 0
    assert value(prepare_reference(frames, "i2v_tail", spec), 0) == 80
    head = prepare_reference(frames, "v2v_head", spec)
    assert [value(head, t) for t in (0, 4, 8)] == [0, 80, 80]
    tail = prepare_reference(frames, "v2v_tail", spec)
    assert [value(tail, t) for t in (0, 4, 8)] == [0, 0, 80]


def test_bundle_round_trip_generates_the_same(pipeline, tmp_path) -> None:
    bundle = pipeline.save_bundle(tmp_path / "bundle")
    assert resolve_model(str(bundle)).kind == "bundle"
    loaded = T2VPipeline.from_bundle(bundle, device="cpu")
    assert loaded.video == pipeline.video
    a = pipeline.generate(["a cyan circle"], [1], OPTS)[0]
    assert np.array_equal(a, loaded.generate(["a cyan circle"], [1], OPTS)[0])


def test_slugs_are_safe_file_names() -> None:
    assert slugify("A red/blue circle: moves *left*!") == "a-red-blue-circle-moves-left"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("日本語 ✨") == "prompt"
    assert len(slugify("x " * 200)) <= SLUG_MAX


def test_outputs_get_seed_plus_index() -> None:
    plan = sample_task.plan_outputs(["a", "b"], 2, 100)
    assert plan == [(0, "a", 100), (1, "a", 101), (2, "b", 102), (3, "b", 103)]


def cli(tmp_path, models, *extra: str) -> int:
    return sample_task.main(
        [
            "--model",
            str(models["diffusion"]),
            "--vae",
            str(models["vae"]),
            "--latent-stats",
            str(models["latent_stats"]),
            "--num-steps",
            "2",
            "--save-dir",
            str(tmp_path / "out"),
            "--set",
            "tracking.enabled=false",
            "-q",
            *extra,
        ]
    )


def test_cli_writes_decodable_videos_with_their_settings(tmp_path, models) -> None:
    csv = tmp_path / "prompts.csv"
    csv.write_text('text\n"first, with a comma"\nsecond / with a slash\nthird\n')
    code = cli(
        tmp_path, models, "--prompts-csv", str(csv), "--start-index", "1", "--num-samples", "2", "--seed", "5"
    )
    assert code == 0
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert [p.name for p in videos] == [
        "0000_second-with-a-slash.mp4",
        "0001_second-with-a-slash.mp4",
        "0002_third.mp4",
        "0003_third.mp4",
    ]
    frames, fps = read_video(videos[3])
    assert frames.shape == (9, 32, 32, 3) and fps == pytest.approx(8.0)
    info = videos[3].with_suffix(".txt").read_text()
    assert "prompt: third" in info and "seed: 8" in info and "num_steps: 2" in info


def test_cli_conditioned_and_t2i2v(tmp_path, models) -> None:
    ref = write_video(tmp_path / "ref.mp4", np.zeros((5, 32, 32, 3), dtype=np.uint8), 8)
    assert cli(tmp_path, models, "--prompt", "p", "--cond-type", "v2v_tail", "--ref", str(ref)) == 0
    assert cli(tmp_path, models, "--prompt", "q", "--t2i2v", "--num-frames", "5", "--fps", "4") == 0
    frames, fps = read_video(tmp_path / "out" / "0000_q.mp4")
    assert frames.shape == (5, 32, 32, 3) and fps == pytest.approx(4.0)
    assert "cond_type: v2v_tail" in (tmp_path / "out" / "0000_p.txt").read_text()


def test_cli_stills_are_png_and_sizes_follow_resolution(tmp_path, models) -> None:
    args = ("--prompt", "s", "--num-frames", "1", "--resolution", "32px", "--aspect-ratio", "1:2")
    assert cli(tmp_path, models, *args) == 0
    frames, _ = read_video(tmp_path / "out" / "0000_s.png")
    h, w = aspect_ratio_table("32px", 16)[0.5]
    assert frames.shape == (1, h, w, 3) and h < w


def test_bad_ref_or_model_exit_2_before_any_model_loads(tmp_path, models, monkeypatch, capsys) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(T2VPipeline, "load", no_loading)
    assert (
        cli(tmp_path, models, "--prompt", "p", "--cond-type", "i2v_head", "--ref", str(tmp_path / "gone.png"))
        == 2
    )
    assert "gone.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli(tmp_path, models, "--prompt", "p", "--cond-type", "i2v_head", "--ref", str(broken)) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli(tmp_path, models, "--prompt", "p", "--cond-type", "i2v_head") == 2
    assert sample_task.main(["--prompt", "p", "--model", str(tmp_path / "nowhere"), "-q"]) == 2
    assert "nowhere" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert sample_task.main(["--prompt", "p", "--model", "models:/opensora-t2v@champion", "-q"]) == 2
    assert "models:/opensora-t2v@champion" in capsys.readouterr().err


def test_resolve_model_names_what_it_cannot_find(tmp_path) -> None:
    with pytest.raises(InputError, match="neither"):
        resolve_model(str(tmp_path))
    write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="not a models:/ URI"):
        resolve_model("some-name")


@pytest.mark.slow
def test_nproc_2_writes_the_same_outputs_as_one_process(tmp_path, models, capfd) -> None:
    # Batches of 2 either way: (0, 1) and (2, 3) in one process, (0, 2) on rank 0 and (1, 3) on
    # rank 1. Same shapes, each sample's noise from its own seed: the same frames, bit for bit.
    args = ("--prompt", "a red circle moves left", "--prompt", "a blue square rises", "--num-samples", "2")
    args += ("--batch-size", "2")
    # The ranks run with launch.omp_num_threads (1) torch threads; so does the in-process run, since
    # a reduction split over another number of threads may round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(tmp_path / "one", models, *args, "--nproc", "1") == 0
    finally:
        torch.set_num_threads(threads)
    assert cli(tmp_path / "two", models, *args, "--nproc", "2") == 0
    out = capfd.readouterr().out
    assert "(rank 0 of 2)" in out and "(rank 1 of 2)" in out  # both ranks wrote their share
    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert [n for n in names if n.endswith(".mp4")] == [
        "0000_a-red-circle-moves-left.mp4",
        "0001_a-red-circle-moves-left.mp4",
        "0002_a-blue-square-rises.mp4",
        "0003_a-blue-square-rises.mp4",
    ]
    for name in names:
        if name.endswith(".mp4"):
            a, _ = read_video(one / name)
            b, _ = read_video(two / name)
            assert a.shape == (9, 32, 32, 3) and np.array_equal(a, b), name
        else:
            assert (one / name).read_text() == (two / name).read_text(), name
