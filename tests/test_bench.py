"""avatar-bench runs and writes its JSON (what it measures is not asserted: speed is not a test)."""

import json

from avatar_stream.engine.bench import main


def test_bench_writes_table_and_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--backend", "cpu", "--audio-backend", "same", "--batch", "1,2",
                 "--repeat", "2", "--seconds", "1", "--streams", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {(r["graph"], r["batch"]) for r in res["graphs"]} == {
        (g, b) for g in ("identity", "audio", "tcsan_decoder") for b in (1, 2)}
    assert res["stream"]["frames"] == 25 and res["backend"] == "cpu"
    assert res["audio_providers"] == ["CPUExecutionProvider"]
    assert res["many_streams"]["frames"] == 50
    assert "tcsan_decoder" in capsys.readouterr().out


def test_bench_bad_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "none"), "--json", str(tmp_path / "b.json")]) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_bad_numbers_are_one_line(tiny_model_dir, tmp_path, capsys):
    for bad in (["--seconds", "0"], ["--repeat", "0"], ["--batch", "0"]):
        assert main(["--model", str(tiny_model_dir), "--backend", "cpu", *bad,
                     "--json", str(tmp_path / "b.json")]) == 2, bad
        assert "error:" in capsys.readouterr().err


def test_bench_photo_and_size(tiny_model_dir, tmp_path, capsys):
    import cv2

    from avatar_stream import DEMO_FACE

    big = tmp_path / "big.jpg"
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(DEMO_FACE)), (1500, 1500)))
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--backend", "cpu", "--batch", "1", "--repeat", "1",
                 "--seconds", "0.5", "--photo", str(big), "--size", "640x360", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["stream"]
    assert s["photo_size"] == [1500, 1500] and s["output_size"] == [360, 640]
    assert "1500x1500 photo, 640x360 output" in capsys.readouterr().out
    assert main(["--model", str(tiny_model_dir), "--backend", "cpu", "--size", "640", "--json", str(out)]) == 2
    assert main(["--model", str(tiny_model_dir), "--backend", "cpu", "--photo", str(tmp_path / "none.jpg"),
                 "--json", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_serve_holds_sessions_over_webrtc(tmp_path, capsys):
    """avatar-serve in its own process, one real loopback WebRTC peer: frames arrive."""
    out = tmp_path / "serve.json"
    assert main(["--serve", "1", "--seconds", "2", "--backend", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["sessions"] for r in rows] == [1]
    # Frames arrive (how many is the benchmark's business: a loaded machine drops some).
    assert rows[0]["sent_total"] > 5 and rows[0]["peers"][0]["video_frames"] > 5
    assert "latency p50" in capsys.readouterr().out


def test_bench_serve_bad_counts_are_one_line(tmp_path, capsys):
    assert main(["--serve", "two", "--json", str(tmp_path / "b.json")]) == 2
    assert "error:" in capsys.readouterr().err
