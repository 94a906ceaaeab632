import pytest
from ciae_core.export import ExportError, read_onnx_metadata

def test_onnx_reader_names_what_the_path_is(tmp_path):
    for path, problem in [(tmp_path, "is a directory"), ("/dev/zero", "is a character device")]:
        with pytest.raises(ExportError) as e:
            read_onnx_metadata(path)
        assert str(e.value) == f"ONNX file {path} {problem}"
