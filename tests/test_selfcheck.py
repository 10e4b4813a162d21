"""The kernel self-check runs and agrees with the reference on every backend available here."""
import loft_kernels as lk
from loft_kernels import selfcheck


def test_selfcheck_reports_every_op_and_backend(capsys):
    assert selfcheck.main(["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for op in selfcheck.CHECKS:
        assert op in out
    for backend in lk.available_backends():
        assert f" {backend} " in out
    assert "all backends agree with the reference" in out


def test_selfcheck_rejects_bad_repeats(capsys):
    import pytest
    with pytest.raises(SystemExit):
        selfcheck.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
