"""The precision choice, driven by a fake timing source: nothing here depends on this machine."""
import json
import os

from trainer import precision

SHAPES = {(576, 576): 60, (576, 192): 60, (576, 1536): 90, (1536, 576): 30}


def fake_timer(fp32_gflops, bf16_gflops, calls):
    """A timing source with fixed speeds; records (precision, shape, rows) of every call."""
    def timer(which, shape, rows, path):
        calls.append((which, shape, rows))
        rate = fp32_gflops if which == 'fp32' else bf16_gflops
        return 2.0 * rows * shape[0] * shape[1] / (rate * 1e9)
    return timer


def test_bf16_units_choose_bf16(tmp_path):
    calls = []
    choice = precision.choose(str(tmp_path), None, False, False, lambda: SHAPES, 'lora',
                              timer=fake_timer(175, 700, calls))
    assert choice['precision'] == 'bf16'
    assert round(choice['fp32_gflops']) == 175 and round(choice['bf16_gflops']) == 700
    assert any(rows > precision.SLICE_ROWS for _w, _s, rows in calls), 'full-size timings were made'


def test_slow_bf16_chooses_fp32(tmp_path):
    calls = []
    choice = precision.choose(str(tmp_path), None, False, False, lambda: SHAPES, 'full',
                              timer=fake_timer(280, 100, calls))
    assert choice['precision'] == 'fp32'
    assert 'pathologically' not in choice['source']  # 2.8x slower: timed at full size, then refused


def test_pathological_bf16_is_found_on_the_slice_alone(tmp_path):
    calls = []
    choice = precision.choose(str(tmp_path), None, False, False, lambda: SHAPES, 'lora',
                              timer=fake_timer(76, 1.2, calls))
    assert choice['precision'] == 'fp32'
    assert 'pathologically slow' in choice['source']
    # never waited on a full-size bf16 matmul: only slice-sized calls on the heaviest shape
    assert calls and all(rows == precision.SLICE_ROWS and shape == (576, 1536) for _w, shape, rows in calls)


def test_full_size_timing_is_bounded_on_a_big_model(tmp_path):
    calls = []
    big = {(4096, 14336): 64, (4096, 4096): 64}
    precision.choose(str(tmp_path), None, False, False, lambda: big, 'lora', timer=fake_timer(50, 60, calls))
    seconds = sum(2.0 * rows * s[0] * s[1] / ((50 if w == 'fp32' else 60) * 1e9) for w, s, rows in calls)
    assert seconds < 1.0, seconds


def test_explicit_setting_overrides_the_measurement(tmp_path):
    calls = []
    forced_fp32 = precision.choose(str(tmp_path), False, False, False, lambda: SHAPES, 'lora',
                                   timer=fake_timer(100, 700, calls))
    forced_bf16 = precision.choose(str(tmp_path), True, False, False, lambda: SHAPES, 'lora',
                                   timer=fake_timer(100, 1, calls))
    assert (forced_fp32['precision'], forced_bf16['precision']) == ('fp32', 'bf16')
    assert calls == [], 'a forced precision is not measured'


def test_cuda_follows_the_gpu_support(tmp_path):
    calls = []
    timer = fake_timer(1, 1, calls)
    assert precision.choose(str(tmp_path), None, True, True, lambda: SHAPES, 'lora', timer=timer)['precision'] == 'bf16'
    assert precision.choose(str(tmp_path), None, True, False, lambda: SHAPES, 'lora', timer=timer)['precision'] == 'fp32'
    assert calls == []


def test_choice_is_recorded_and_a_resume_keeps_it(tmp_path):
    first = precision.choose(str(tmp_path), None, False, False, lambda: SHAPES, 'lora', timer=fake_timer(76, 1.2, []))
    recorded = json.load(open(os.path.join(str(tmp_path), precision.RECORD)))
    assert recorded['precision'] == first['precision'] == 'fp32'
    # the machine now looks bf16-fast; the resumed run keeps the first run's choice all the same
    calls = []
    resumed = precision.choose(str(tmp_path), None, False, False, lambda: SHAPES, 'lora', resume=True,
                               timer=fake_timer(100, 700, calls))
    assert resumed['precision'] == 'fp32' and resumed['source'] == 'kept from the first run'
    assert calls == []


def test_event_text_names_choice_and_figures():
    text = precision.describe({'precision': 'fp32', 'fp32_gflops': 122.4, 'bf16_gflops': 1.2,
                               'source': 'measured on the lora path', 'threads': 2})
    assert text == 'precision: fp32 (fp32 122 GFLOP/s, bf16 1 GFLOP/s; measured on the lora path, 2 threads)'


def test_available_cores_follow_the_affinity():
    cores = precision.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
