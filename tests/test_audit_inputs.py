"""The audit reads only regular files of a bounded size: a ledger or record replaced by a FIFO, a device, a
directory or a huge file is an input finding naming it, never a hang or an exhausted memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsocial.shared.privacy.audit import audit_run
from fedsocial.simulations.audit import EXIT_INPUT
from tests.test_audit_manifest_bounds import _run


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_a_ledger_or_record_that_is_no_regular_file_is_refused_without_reading_it(tmp_path: Path, kind: str) -> None:
    # Prepare: north's ledger replaced by a FIFO (reading blocks for ever; was: the audit hung), a link to
    # /dev/zero (was: read until the memory ran out), a directory, or a sparse file of 2 GiB
    import os

    from fedsocial.shared.privacy import audit as audit_module

    _run(tmp_path, 1e-5, 500)
    ledger = tmp_path / "ledgers" / "north.jsonl"
    ledger.unlink()
    if kind == "fifo":
        os.mkfifo(ledger)
    elif kind == "device":
        ledger.symlink_to("/dev/zero")
    elif kind == "directory":
        ledger.mkdir()
    else:
        with open(ledger, "wb") as fh:
            fh.truncate(audit_module.MAX_INPUT_BYTES + 1)
    # Execute
    result = audit_run(tmp_path)
    # Assert: one input finding naming the file, returned at once
    assert result.exit_code == EXIT_INPUT
    (finding,) = result.findings
    assert str(ledger) in finding.message and "not read" in finding.message
