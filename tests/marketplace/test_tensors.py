"""The safetensors header reader is bounded: a hostile header is a TensorFileError (a 400 where a file is
checked), never a crash; well-formed files read as before."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save

from marketplace.core.tensors import MAX_DIMS, MAX_TENSORS, TensorFileError, TensorInfo, read_header

ROOT = Path(__file__).resolve().parents[2]
DEEP_HEADER = b"[" * 100_000 + b"]" * 100_000  # 200 KB


def safetensors_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def header_of(tensors: dict) -> bytes:
    return json.dumps(tensors, separators=(",", ":")).encode()


def test_a_header_nested_100000_deep_is_a_tensor_file_error(tmp_path) -> None:
    path = safetensors_file(tmp_path / "deep.safetensors", DEEP_HEADER)

    with pytest.raises(TensorFileError, match="nested deeper than 4"):
        read_header(path)


def test_it_stays_a_tensor_file_error_where_the_recursion_limit_is_100000(tmp_path) -> None:
    # py_ecc sets this limit at import; with it, json.loads of this header kills the process (SIGSEGV,
    # exit -11 here). A child process, so that a regression fails this test instead of the whole run.
    path = safetensors_file(tmp_path / "deep.safetensors", DEEP_HEADER)
    program = (
        "import sys\n"
        "from marketplace.core.tensors import TensorFileError, read_header\n"
        "sys.setrecursionlimit(100_000)\n"
        "try:\n"
        f"    read_header(__import__('pathlib').Path({str(path)!r}))\n"
        "except TensorFileError as exc:\n"
        "    print('refused:', exc)\n"
    )

    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"DJANGO_SETTINGS_MODULE": "marketplace.settings", "PATH": "/usr/bin:/bin"})

    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: not a safetensors file: its header is refused: nested deeper than 4" in done.stdout


def test_a_well_formed_file_with_metadata_reads_as_before(tmp_path, make_weights) -> None:
    import torch

    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float64)}, metadata={"k": "v"}))

    header = read_header(path)

    assert set(header) == {"a", "b"}
    assert header["a"].dtype == "F32" and header["a"].shape == (2, 3)
    assert header["b"] == TensorInfo(dtype="F64", shape=(4,), start=header["b"].start, end=header["b"].start + 32)


def test_a_shape_of_more_than_16_dimensions_is_refused(tmp_path) -> None:
    shape = [1] * (MAX_DIMS + 1)
    path = safetensors_file(tmp_path / "dims.safetensors",
                            header_of({"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}), b"\0")

    with pytest.raises(TensorFileError, match="more than 16 dimensions"):
        read_header(path)


def test_16_dimensions_are_fine(tmp_path) -> None:
    shape = [1] * MAX_DIMS
    path = safetensors_file(tmp_path / "dims.safetensors",
                            header_of({"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}), b"\0")

    assert read_header(path)["t"].shape == tuple(shape)


def test_more_than_100000_tensors_are_refused(tmp_path) -> None:
    tensors = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    path = safetensors_file(tmp_path / "many.safetensors", header_of(tensors))

    with pytest.raises(TensorFileError, match="more than 100000 tensors"):
        read_header(path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),  # unhashable: was a TypeError
    ({"dtype": "F32", "shape": [1], "data_offsets": [True, 4]}, "malformed data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, int("9" * 21)]}, "more than 20 digits"),
])
def test_a_malformed_entry_is_a_tensor_file_error(tmp_path, entry: dict, message: str) -> None:
    path = safetensors_file(tmp_path / "bad.safetensors", header_of({"t": entry}), b"\0" * 4)

    with pytest.raises(TensorFileError, match=message):
        read_header(path)


def test_a_long_tensor_name_is_cut_in_the_message(tmp_path) -> None:
    path = safetensors_file(tmp_path / "name.safetensors", header_of({"n" * 100_000: "not an object"}))

    with pytest.raises(TensorFileError) as caught:
        read_header(path)

    assert len(str(caught.value)) < 200


def test_a_job_whose_weights_header_is_a_depth_bomb_is_400(api, submitter, upload, make_dataset, tmp_path) -> None:
    weights = upload(safetensors_file(tmp_path / "w.safetensors", DEEP_HEADER).read_bytes(), submitter)
    dataset = upload(make_dataset(8), submitter)
    spec = {"model": {"architecture": "mlp", "config": {"in_features": 4, "hidden": [8], "out_features": 3},
                      "weights": weights}, "dataset": dataset}

    response = api(submitter).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 400
    assert "nested deeper than 4" in response.json()["error"]["fields"]["model.weights"]


def test_a_report_whose_output_header_is_a_depth_bomb_is_400(submit_job, make_device, contributor, upload,
                                                              tmp_path) -> None:
    from marketplace.workunits.leasing import workunit_lease
    from marketplace.workunits.models import Result

    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    result = Result.objects.get(pk=lease.result_id)
    sha = upload(safetensors_file(tmp_path / "out.safetensors", DEEP_HEADER).read_bytes(), device=device.device)

    response = device.client().post(f"/api/v1/agent/results/{result.pk}/report",
                                    {"output_sha256": sha, "signature": device.sign(result, sha)}, format="json")

    assert response.status_code == 400
    assert "nested deeper than 4" in response.json()["error"]["message"]
    result.refresh_from_db()
    assert result.state == Result.State.IN_PROGRESS
