#!/usr/bin/env python3
"""Unit tests of soak.py's RSS verdict (no server needed): transient spikes pass, a rising floor fails.

Run: python3 scripts/test_soak.py   (scripts/test.sh runs it before the short soak)
"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak  # noqa: E402

MIB = 1024


def series(duration_s, floor_mib, step_s=0.5, spike_every=7, spike_mib=0, leak_mib_per_s=0.0):
    """[(t, KiB)]: a floor, optionally rising linearly, with one-sample spikes every `spike_every` samples."""
    out, i = [], 0
    while i * step_s <= duration_s:
        t = i * step_s
        kib = (floor_mib + leak_mib_per_s * t) * MIB
        if spike_mib and i % spike_every == spike_every - 1:
            kib += spike_mib * MIB
        out.append((t, int(kib)))
        i += 1
    return out


class RssVerdict(unittest.TestCase):
    def test_spikes_above_a_flat_floor_pass(self):
        # The CI failure this replaces: one-sample prefill spikes (+30%) read as growth.
        ok, fig = soak.rss_verdict(series(11, 350, spike_mib=120), 120, 0.10, 10)
        self.assertTrue(ok, fig)
        self.assertEqual(fig["rss_baseline_floor_mib"], 350.0)
        self.assertEqual(fig["rss_end_floor_mib"], 350.0)
        self.assertGreater(fig["rss_peak_mib"], 460)

    def test_a_rising_floor_fails_in_a_short_run(self):
        # 350 MiB growing 6 MiB/s: the last quarter's floor is ~14% above the first quarter's.
        ok, fig = soak.rss_verdict(series(11, 350, spike_mib=120, leak_mib_per_s=6), 120, 0.10, 10)
        self.assertFalse(ok, fig)
        self.assertGreater(fig["rss_growth_pct"], 10)

    def test_a_one_off_step_early_in_a_short_run_passes_but_a_late_one_fails(self):
        # The allocator grows once by 12% in the second quarter, then stays: not a leak.
        step = [(t, kib + (42 * MIB if t >= 4.0 else 0)) for t, kib in series(11, 350, spike_mib=120)]
        ok, fig = soak.rss_verdict(step, 120, 0.10, 10)
        self.assertTrue(ok, fig)
        self.assertGreater(fig["rss_growth_pct"], 10)
        self.assertIn("still growing", fig["rss_rule"])
        # The same step in the third quarter: growth still going on over the last two quarters is a failure.
        late = [(t, kib + (42 * MIB if t >= 7.0 else 0)) for t, kib in series(11, 350)]
        ok, fig = soak.rss_verdict(late, 120, 0.10, 10)
        self.assertFalse(ok, fig)

    def test_long_runs_take_the_baseline_window_at_baseline_s(self):
        # Growth before 120 s (warm-up) is not counted; a leak after it is.
        warm = [(t, kib + (0 if t >= 120 else -100 * MIB)) for t, kib in series(300, 400)]
        ok, fig = soak.rss_verdict(warm, 120, 0.10, 10)
        self.assertTrue(ok, fig)
        self.assertIn("[120, 130] s", fig["rss_rule"])
        leaking = series(300, 400, leak_mib_per_s=0.5)  # +90 MiB over 180 s after the baseline: ~+19%
        ok, fig = soak.rss_verdict(leaking, 120, 0.10, 10)
        self.assertFalse(ok, fig)

    def test_too_few_samples_is_a_failure_not_a_pass(self):
        ok, fig = soak.rss_verdict([(0.0, 1000), (0.5, 1000)], 120, 0.10, 10)
        self.assertFalse(ok)
        self.assertIn("too short", fig["error"])


if __name__ == "__main__":
    unittest.main()
