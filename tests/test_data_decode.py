"""Decoding real mp4 files written with PyAV: timestamps, seeking, audio, odd sizes, short and bad inputs."""

import io
import multiprocessing
from fractions import Fraction

import av
import numpy as np
import pytest

from data.decode import DecodeError, decode_image, decode_video, probe_video, rgb24
from data.synthetic import write_corrupt, write_video, write_zero_byte

FPS = 25


def ramp(num_frames, height=48, width=64):
    """Frame t is uniformly grey level 8 * t: the decoded value tells which frame was picked."""
    return np.repeat((np.arange(num_frames, dtype=np.uint8) * 8)[:, None, None, None], height, 1) \
        .repeat(width, 2).repeat(3, 3)


def frame_ids(frames):
    return np.rint(frames.reshape(len(frames), -1).mean(1) / 8).astype(int).tolist()


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory):
    path = write_video(tmp_path_factory.mktemp("v") / "ramp.mp4", ramp(30), FPS, gop=4)
    return path.read_bytes()


def test_frames_are_chosen_by_timestamp_in_any_order(ramp_video):
    times = np.array([0.5, 0.0, 0.04, 0.0799, 1.0, 0.61])
    frames, info = decode_video(ramp_video, lambda _: times)
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == [12, 0, 1, 1, 25, 15]
    assert info.duration == pytest.approx(30 / FPS) and info.fps == FPS
    assert (info.width, info.height) == (64, 48)


def test_times_past_the_end_repeat_the_last_frame(ramp_video):
    frames, _ = decode_video(ramp_video, lambda info: info.duration + np.array([0.0, 5.0]))
    assert frame_ids(frames) == [29, 29]


def test_variable_frame_rate_uses_timestamps(tmp_path):
    """Frames at irregular times: selection must follow pts, not frame counts."""
    pts_ms = [0, 10, 200, 210, 900, 1000]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for pts, image in zip(pts_ms, ramp(len(pts_ms))):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    frames, _ = decode_video(path.read_bytes(), lambda _: np.array([0.005, 0.1, 0.5, 0.95]))
    assert frame_ids(frames) == [0, 1, 3, 4]


# (container, encoder, options): H.264 and HEVC get a skip plan, the others decode every frame.
CODECS = {
    "h264-seeks": ("mp4", "libx264", {"g": "12", "preset": "veryfast"}),
    "h264-one-key-frame": ("mp4", "libx264", {"g": "250", "preset": "veryfast"}),
    "h264-mkv": ("mkv", "libx264", {"g": "12", "preset": "veryfast"}),
    "h264-open-gop": ("mp4", "libx264", {"g": "12", "x264-params": "open-gop=1:bframes=3"}),
    "hevc": ("mp4", "libx265", {"g": "12", "preset": "veryfast", "x265-params": "log-level=none"}),
    "av1": ("mp4", "libsvtav1", {"g": "12", "preset": "12"}),
    "vp9": ("webm", "libvpx-vp9", {"g": "12", "deadline": "realtime"}),
    "mpeg4-open-gop": ("mp4", "mpeg4", {"g": "12", "bf": "2", "flags": "-cgop"}),
}


def grey_ramp_video(path, fps=FPS, **encoder):
    """60 frames, frame t uniformly grey level 4 t (the decoded value tells which frame was picked)."""
    levels = np.arange(60, dtype=np.uint8) * 4
    clip = np.repeat(levels[:, None, None, None], 48, 1).repeat(64, 2).repeat(3, 3)
    return write_video(path, clip, fps, **encoder).read_bytes()


def assert_picks_what_a_full_decode_shows(data, time_sets):
    with av.open(io.BytesIO(data)) as container:
        shown = [(frame.time, int(np.rint(rgb24(frame).mean() / 4))) for frame in container.decode(video=0)]
    for times in time_sets:
        expected = [max([i for t0, i in shown if t0 <= t + 1e-6], default=shown[0][1]) for t in times]
        frames, _ = decode_video(data, lambda _: times)  # noqa: B023
        assert np.rint(frames.reshape(len(times), -1).mean(1) / 4).astype(int).tolist() == expected, times


@pytest.mark.parametrize("codec", list(CODECS))
def test_frames_picked_are_those_a_full_decode_shows(tmp_path, codec):
    """Whatever the codec, and whether or not the decoder skips frames that are neither shown nor referenced,
    the frames picked must be exactly those that plain PyAV, decoding every frame, shows at the same times."""
    ext, encoder, options = CODECS[codec]
    data = grey_ramp_video(tmp_path / f"v.{ext}", codec=encoder, options=options)
    if codec.startswith("h264"):
        with av.open(io.BytesIO(data)) as container:
            container.streams.video[0].codec_context.skip_frame = "NONREF"
            assert sum(1 for _ in container.decode(video=0)) < 45, "the video needs unreferenced B-frames"
    rng = np.random.default_rng(0)
    random_sets = [np.sort(rng.uniform(-0.1, 2.6, size=int(rng.integers(1, 17)))) for _ in range(20)]
    # Single times on a grid: after a seek to a key frame shown after the open GOP's leading B-frames, a
    # time inside those frames gets nothing until the decoder rewinds to the start.
    assert_picks_what_a_full_decode_shows(data, random_sets + [np.array([t]) for t in np.arange(0.0, 2.4, 0.02)])


def test_frames_sharing_a_timestamp_pick_the_last(tmp_path):
    """At 1200 fps in Matroska's millisecond time base, neighbouring frames round to the same timestamp."""
    data = grey_ramp_video(tmp_path / "v.mkv", fps=1200)
    assert_picks_what_a_full_decode_shows(data, [np.array([t]) for t in np.arange(0.0, 0.05, 0.001)])


def test_audio_stream_and_odd_size_smaller_than_a_crop(tmp_path):
    path = write_video(tmp_path / "odd.mp4", ramp(8, height=17, width=23), FPS, audio=True)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    frames, info = decode_video(path.read_bytes(), lambda _: np.array([0.0, 0.12]))
    assert frames.shape == (2, 17, 23, 3) and (info.width, info.height) == (23, 17)
    assert frame_ids(frames) == [0, 3]


def test_very_short_video(tmp_path):
    data = write_video(tmp_path / "short.mp4", ramp(2), FPS).read_bytes()
    frames, info = decode_video(data, lambda info: np.arange(8) * 0.1)
    assert frame_ids(frames) == [0, 1, 1, 1, 1, 1, 1, 1]
    assert info.duration == pytest.approx(2 / FPS)


@pytest.mark.parametrize("live", [False, True], ids=["with-duration", "no-duration"])
def test_webm_without_frame_count_or_duration(tmp_path, live):
    """VP9 WebM, as Something-Something-V2 ships: PyAV reports ``frames == 0`` and no stream duration, and a
    WebM written as a live stream states no duration at all (PyAV#1131). The duration then comes from the
    packet timestamps, and decoding still starts at the first frame."""
    data = write_video(tmp_path / "v.webm", ramp(24), 12, codec="libvpx-vp9", options={"deadline": "realtime"},
                       muxer_options={"live": "1"} if live else None).read_bytes()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.frames == 0 and stream.duration is None and (container.duration is None) == live
    assert probe_video(data).duration == pytest.approx(2.0)
    frames, info = decode_video(data, lambda info: np.array([0.55, info.duration - 0.01, 0.0]))
    assert info.duration == pytest.approx(2.0) and info.fps == 12
    assert frame_ids(frames) == [6, 23, 0]


def test_bad_inputs_raise_decode_error(tmp_path, ramp_video):
    (tmp_path / "ok.mp4").write_bytes(ramp_video)
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    bad = {
        "zero-byte": write_zero_byte(tmp_path / "empty.mp4"),
        "unreadable": write_corrupt(tmp_path / "noise.mp4"),
        "truncated": write_corrupt(tmp_path / "cut.mp4", tmp_path / "ok.mp4"),
        "no video stream": audio_only,
    }
    for expected, path in bad.items():
        with pytest.raises(DecodeError) as err:
            decode_video(path.read_bytes(), lambda _: np.zeros(1))
        with pytest.raises(DecodeError):
            probe_video(path.read_bytes())
        if expected in ("zero-byte", "no video stream"):
            assert expected in str(err.value)
    with pytest.raises(DecodeError):
        decode_image(ramp_video)


def _convert_in_child(data):
    decode_video(data, lambda _: np.arange(4) * 0.04)


def test_decoding_works_in_a_worker_forked_after_decoding(tmp_path):
    """DataLoader workers are forked from a process that may have decoded already (swscale's thread pool
    does not survive a fork: the child used to hang)."""
    data = write_video(tmp_path / "wide.mp4", ramp(4, height=240, width=320), FPS).read_bytes()
    decode_video(data, lambda _: np.arange(4) * 0.04)
    child = multiprocessing.get_context("fork").Process(target=_convert_in_child, args=(data,))
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
