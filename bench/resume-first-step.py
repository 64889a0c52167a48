#!/usr/bin/env python3
# Where the first heartbeat step after a resume goes (docs/migration.md, "What keeps the
# guest's gap at 214 ms above 0.5 s"): the demo's guest and workload on QEMU's own
# virtio-blk (no strait), first stopped and continued three times on one QEMU, then
# migrated by QEMU alone to a second QEMU on the same host (`migrate unix:`). Prints the
# guest-clock length of the heartbeat steps around each resume (from /proc/uptime, 10 ms
# resolution). Needs root, QEMU and the test guest (scripts/guest/build.sh); about a minute:
#
#   flock /tmp/strait-heavy.lock python3 bench/resume-first-step.py
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestrig import QMP, heartbeats as hb, scratch_image, start_qemu
W='/tmp/strait-resume-first-step'
img=scratch_image(W)
def qemu(name, incoming=None):
    return start_qemu(W, name, img, 60, incoming)
def around(beats, t0, label):
    # steps (uptime deltas) of the heartbeats just before and after host time t0
    before=[b for b in beats if b[0]<t0][-4:]; after=[b for b in beats if b[0]>=t0][:4]
    seq=before+after
    d=[round((seq[i+1][2]-seq[i][2])*1000) for i in range(len(seq)-1)]
    print(label, 'steps ms (guest clock), the resume between #%d and #%d:'%(len(before)-1,len(before)), d, flush=True)
src,sl=qemu('src'); q=QMP(f'{W}/src.qmp')
while len(hb(sl))<300: time.sleep(0.2)
time.sleep(3)
for k in range(3):
    q.cmd('stop'); time.sleep(0.4); t=time.monotonic(); q.cmd('cont'); time.sleep(3)
    around(hb(sl), t, f'stop/cont {k}:')
dst,dl=qemu('dst', incoming=f'unix:{W}/mig.sock'); time.sleep(1); qd=QMP(f'{W}/dst.qmp')
q.cmd('migrate', uri=f'unix:{W}/mig.sock')
while q.cmd('query-migrate').get('status')!='completed': time.sleep(0.05)
while qd.cmd('query-status')['status']!='running': time.sleep(0.01)
t=time.monotonic(); time.sleep(3)
s=hb(sl)[-4:]; d=hb(dl)[:4]; seq=s+d
print('migration: steps ms (guest clock), the resume between #3 and #4:', [round((seq[i+1][2]-seq[i][2])*1000) for i in range(len(seq)-1)], 'first dst line', dl[:2])
for p in (src,dst): p.kill()
