"""The demo's test guest under a QEMU of its own (TCG, QEMU's own virtio-blk, no strait),
for the Python measurements in bench/ (resume-first-step.py, penalty-floor.py): start a
QEMU with the `migrate` workload and read its console with host timestamps, talk QMP, and
pick the heartbeats out of the console."""
import json, os, re, socket, subprocess, threading, time

GUEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '.cache', 'guest')

# How long QMP's socket may take to appear after QEMU starts.
QMP_CONNECT_TRIES, QMP_CONNECT_PAUSE_S = 100, 0.1

HEARTBEAT = re.compile(r'STRAIT-HB i=(\d+) up=([\d.]+)$')

# The guest's disk: the size the demo gives it.
IMAGE_SIZE = '64M'


def scratch_image(workdir):
    """Makes `workdir` and a raw image for the guest's disk in it; returns the image path."""
    os.makedirs(workdir, exist_ok=True)
    image = f'{workdir}/disk.img'
    subprocess.run(['truncate', '-s', IMAGE_SIZE, image], check=True)
    return image


def guest_core():
    """Moves this process, and so every QEMU it starts, onto all its cores but the last,
    and returns the last one for the guest's vCPU thread, as `strait demo` pins it."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit('needs two cores: the vCPU gets one of its own')
    os.sched_setaffinity(0, cpus[:-1])
    return cpus[-1]


def start_qemu(workdir, name, image, workload_s, incoming=None):
    """Starts QEMU `name` (its QMP socket is WORKDIR/NAME.qmp) on `image` with the guest's
    `migrate` workload running `workload_s` seconds. Returns the process and its console,
    a list of (host monotonic time, line) that a reader thread keeps appending to."""
    if not os.path.exists(f'{GUEST_DIR}/vmlinuz'):
        raise SystemExit(f'no test guest in {GUEST_DIR}: run scripts/guest/build.sh')
    args = ['qemu-system-x86_64', '-accel', 'tcg', '-machine', 'pc', '-nodefaults',
            '-no-user-config', '-smp', '1', '-m', '256M',
            '-blockdev', f'driver=raw,node-name=d0,file.driver=file,file.filename={image}',
            '-device', 'virtio-blk-pci,drive=d0,id=vda',
            '-kernel', f'{GUEST_DIR}/vmlinuz', '-initrd', f'{GUEST_DIR}/initramfs.gz',
            '-append', f'console=ttyS0 quiet panic=-1 strait.test=migrate strait.arg={workload_s}',
            '-display', 'none', '-serial', 'stdio', '-monitor', 'none', '-no-reboot',
            '-qmp', f'unix:{workdir}/{name}.qmp,server=on,wait=off']
    if incoming:
        args += ['-incoming', incoming]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.decode(errors='replace').strip()))
    threading.Thread(target=read, daemon=True).start()
    return proc, lines


class QMP:
    """One QMP connection; `cmd` returns the command's `return` value or raises."""

    def __init__(self, path):
        for _ in range(QMP_CONNECT_TRIES):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                time.sleep(QMP_CONNECT_PAUSE_S)
        else:
            raise SystemExit(f'QMP socket {path} did not accept a connection')
        self.file = self.sock.makefile('rw')
        self.file.readline()  # the greeting
        self.cmd('qmp_capabilities')

    def cmd(self, command, **arguments):
        self.file.write(json.dumps({'execute': command, 'arguments': arguments}) + '\n')
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise SystemExit(f'QMP closed the connection during {command}')
            reply = json.loads(line)
            if 'return' in reply:
                return reply['return']
            if 'error' in reply:
                raise RuntimeError(f'{command}: {reply["error"]}')


def heartbeats(lines):
    """The console's heartbeats: (host time, number, guest uptime in seconds)."""
    out = []
    for t, line in list(lines):
        m = HEARTBEAT.match(line)
        if m:
            out.append((t, int(m.group(1)), float(m.group(2))))
    return out
