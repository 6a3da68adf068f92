from fault.kill_resume import STAGES, run_faults


def test_ten_random_kills_across_all_stages_lose_nothing_and_change_no_number(tmp_path):
    result = run_faults(str(tmp_path), kills=10, seed=0)
    assert result["kills"] == 10 and result["resumes"] == 10
    assert result["lost"] == 0
    assert result["identical"]
    # Kills landed in most stages (a short stage can end before its kill).
    assert len(set(result["stages"]) & set(STAGES)) >= 3, result["stages"]
