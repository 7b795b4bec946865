from __future__ import annotations

import torch

from MIADeepLearningLib.training import report


def test_curve_table_keeps_first_and_last_rows_and_marks_missing_values():
    history = [{"iteration": 0, "hours": 0.0, "train_l1": None, "val_psnr": 17.3456},
               *({"iteration": i, "hours": i / 1000, "train_l1": 0.05, "val_psnr": 20.0 + i / 1000} for i in
                 (250, 500, 750))]
    lines = report.curve_table(history, every=2).splitlines()
    assert lines[0] == "| iteration | hours | train_l1 | val_psnr |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0", "500", "750"]
    assert "| 0 | 0.0000 | – | 17.35 |" == lines[2]
    assert report.curve_table([]) == "(no validation recorded)"


def test_report_prints_iterations_commands_and_table(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"iteration": 5, "wall_seconds": 7200.0, "commands": ["[from iteration 0] python -m x"],
                "history": [{"iteration": 5, "val_psnr": 21.0}]}, checkpoint)
    assert report.main([str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "iterations: 5, wall time: 2.00 h" in out and "command: [from iteration 0] python -m x" in out
    assert "| 5 | 21.00 |" in out
