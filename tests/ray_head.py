"""A real single-node Ray head for the tests: started from the trainer environment on free
loopback ports, with a temp folder of its own, and stopped by its own processes' pids (never
`ray stop`, which stops every Ray on the host)."""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psutil
import requests

MARKER = 'LLMT_TEST_RAY_HEAD'  # in the environment of every process of this head (and its jobs)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class RayHead(object):
    def __init__(self, python):
        self.ray = os.path.join(os.path.dirname(python), 'ray')
        # Short: Ray puts unix sockets under it (108 characters at most).
        self.tmp = tempfile.mkdtemp(prefix='llmt-ray-', dir='/tmp')
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        self.url = 'http://127.0.0.1:%d' % self.dashboard_port

    def start(self, timeout=90):
        env = dict(os.environ, RAY_TMPDIR=self.tmp, **{MARKER: self.tmp})
        subprocess.run([self.ray, 'start', '--head', '--port', str(self.gcs_port), '--dashboard-host', '127.0.0.1',
                        '--dashboard-port', str(self.dashboard_port), '--num-cpus', '2', '--disable-usage-stats',
                        '--ray-client-server-port', str(free_port()),
                        '--dashboard-agent-listen-port', str(free_port())],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:  # `ray start` returns before the dashboard serves
            try:
                if requests.get(self.url + '/api/version', timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError('the Ray head did not serve %s within %d s' % (self.url, timeout))

    def processes(self):
        """The head's processes: those with our marker, and their descendants (Ray's agents
        rewrite their process title over their environment, so the marker is lost there)."""
        mine = set()
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) == self.tmp:
                    mine.add(process)
                    mine.update(process.children(recursive=True))
            except psutil.Error:
                continue
        return list(mine)

    def kill(self):
        """The head machine dies: every process of it, the jobs it runs too, at once."""
        self._end(grace=0)

    def stop(self):
        self._end(grace=10)  # gcs_server, raylet and the monitor ignore SIGTERM: killed after
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _end(self, grace):
        # Until none is left: a raylet still alive restarts the agents we end before it.
        for _round in range(10):
            processes = self.processes()
            if not processes:
                return
            for process in processes:
                try:
                    process.terminate() if grace else process.kill()
                except psutil.Error:
                    pass
            _gone, alive = psutil.wait_procs(processes, timeout=grace or 30)
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=30)
        raise RuntimeError('processes of the Ray head in %s survive: %s' % (self.tmp, self.processes()))

    def jobs(self):
        return requests.get(self.url + '/api/jobs/', timeout=10).json()
