"""experiment/children.py: what the parent reads from a child's console file."""
from experiment.comparisons.children import last_line, progress, use_children


def test_progress_reads_the_newest_bar_of_a_console(tmp_path):
    console = tmp_path / "console.txt"
    console.write_text("12:00:01 INFO start\n"
                       "aux:  50%|#####     | 100/200 [00:10<00:10]\raux: 100%|##########| 200/200 [00:20<00:00]\n"
                       "uniform_32x32:   4%|4         | 21/500 [00:02<00:50, 9.5it/s, loss=1.2]\r"
                       "uniform_32x32:   5%|5         | 25/500 [00:02<00:50, 9.5it/s, loss=1.1]")
    assert progress(str(console)) == "uniform_32x32 25/500"
    console.write_text("validation @ 480: 100%|##########| 20/20 [00:02<00:00, 10.06img/s]\n")
    assert progress(str(console)) == "validation @ 480 20/20"
    console.write_text("no bar yet\n")
    assert progress(str(console)) == ""
    assert progress(str(tmp_path / "missing.txt")) == ""


def test_last_line_is_the_childs_error(tmp_path):
    console = tmp_path / "console.txt"
    console.write_text("train:  1%|1 | 3/480\rtrain:  1%|1 | 4/480\nerror: data.dataset_dir /x: no such directory\n\n")
    assert last_line(str(console)) == "error: data.dataset_dir /x: no such directory"
    assert last_line(str(tmp_path / "missing.txt")) == "no console output"


def test_child_processes_only_for_single_process_jobs():
    assert use_children(2, 1, "weak.processes")
    assert not use_children(1, 1, "weak.processes")
    assert not use_children(3, 2, "nus.processes")  # under torchrun every run uses all ranks
