"""Processes we start are clean of the Odoo worker that starts them (lib/host/processes.py), and
the time limits of Odoo's workers as the addon reads them (lib/host/limits.py). Plain functions."""
import json
import os
import subprocess
import sys
import textwrap
import unittest

from odoo.addons.llm_training.lib.host import limits

ADDON_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for an Odoo worker: it lowers its soft limits exactly as Worker.process_limit does,
# opens a file descriptor a child could inherit, then starts two children that report their
# limits, open descriptors, session and working folder: one with our spawn, one with plain Popen.
WORKER = textwrap.dedent('''
    import json, os, resource, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from host import processes
    soft_as, hard_as = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (2560 * 1024 * 1024, hard_as))
    used = resource.getrusage(resource.RUSAGE_SELF)
    resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + 60, resource.getrlimit(resource.RLIMIT_CPU)[1]))
    leaked = os.dup2(os.open(os.devnull, os.O_RDONLY), 50)  # above what listing /proc/self/fd opens
    os.set_inheritable(leaked, True)
    os.chdir('/')
    report = ("import json, os, resource; print(json.dumps({'as': resource.getrlimit(resource.RLIMIT_AS), "
              "'cpu': resource.getrlimit(resource.RLIMIT_CPU), 'fds': sorted(int(f) for f in os.listdir('/proc/self/fd')), "
              "'sid': os.getsid(0), 'cwd': os.getcwd()}))")
    ours = processes.spawn([sys.executable, '-c', report], cwd=sys.argv[2], detached=True, stdout=subprocess.PIPE)
    plain = subprocess.Popen([sys.executable, '-c', report], stdout=subprocess.PIPE, close_fds=False)
    print(json.dumps({'ours': json.loads(ours.communicate()[0]), 'plain': json.loads(plain.communicate()[0]),
                      'leaked_fd': leaked, 'sid': os.getsid(0)}))
''')


class TestSpawnedProcesses(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        out = subprocess.run([sys.executable, '-c', WORKER, os.path.join(ADDON_ROOT, 'lib'), ADDON_ROOT],
                             stdout=subprocess.PIPE, check=True, timeout=60).stdout
        cls.report = json.loads(out.decode())

    def test_address_space_and_cpu_time_limits_are_the_hard_limits(self):
        ours, plain = self.report['ours'], self.report['plain']
        self.assertEqual(ours['as'][0], ours['as'][1])
        self.assertEqual(ours['cpu'][0], ours['cpu'][1])
        # what a plain child of the worker gets (the bug): the worker's lowered soft limits
        self.assertEqual(plain['as'][0], 2560 * 1024 * 1024)
        self.assertNotEqual(plain['cpu'][0], plain['cpu'][1])

    def test_only_stdio_is_inherited_and_the_working_folder_is_given(self):
        ours = self.report['ours']
        self.assertNotIn(self.report['leaked_fd'], ours['fds'])
        self.assertIn(self.report['leaked_fd'], self.report['plain']['fds'])
        self.assertEqual(ours['cwd'], os.path.realpath(ADDON_ROOT))

    def test_detached_child_has_its_own_session(self):
        self.assertNotEqual(self.report['ours']['sid'], self.report['sid'])
        self.assertEqual(self.report['plain']['sid'], self.report['sid'])


class TestWorkerTimeLimits(unittest.TestCase):

    def test_threaded_and_evented_servers_kill_nothing(self):
        self.assertIsNone(limits.worker_time_limit({'workers': 0, 'limit_time_real': 120}))
        self.assertIsNone(limits.worker_time_limit({'workers': 2, 'limit_time_real': 120}, evented=True))
        self.assertIsNone(limits.deadline({'workers': 0, 'limit_time_real': 120}, started=1000))

    def test_request_deadline_keeps_the_watchdog_beat_and_a_margin(self):
        config = {'workers': 2, 'limit_time_real': 120}
        self.assertEqual(limits.deadline(config, started=1000), 1000 + 120 - limits.WATCHDOG_BEAT - limits.SAFETY)
        # a tiny limit still leaves the request half of it
        self.assertEqual(limits.deadline({'workers': 2, 'limit_time_real': 8}, started=1000), 1004)

    def test_cron_limit_follows_odoo_rules(self):
        self.assertEqual(limits.worker_time_limit({'workers': 2, 'limit_time_real': 120, 'limit_time_real_cron': -1},
                                                  cron=True), 120)
        self.assertEqual(limits.worker_time_limit({'workers': 2, 'limit_time_real': 120, 'limit_time_real_cron': 30},
                                                  cron=True), 30)
        self.assertIsNone(limits.worker_time_limit({'workers': 2, 'limit_time_real': 120, 'limit_time_real_cron': 0},
                                                   cron=True))

    def test_cron_budget_is_at_most_half_the_cron_limit(self):
        self.assertEqual(limits.cron_budget({'workers': 0}, 45), 45)
        self.assertEqual(limits.cron_budget({'workers': 2, 'limit_time_real': 120, 'limit_time_real_cron': -1}, 45), 45)
        self.assertEqual(limits.cron_budget({'workers': 2, 'limit_time_real': 30, 'limit_time_real_cron': -1}, 45), 15)
