#!/usr/bin/env python3
# Where the first heartbeat step after a resume goes (docs/migration.md, "What keeps the
# guest's gap at 214 ms above 0.5 s"): the demo's guest and workload on QEMU's own
# virtio-blk (no strait), first stopped and continued three times on one QEMU, then
# migrated by QEMU alone to a second QEMU on the same host (`migrate unix:`). Prints the
# guest-clock length of the heartbeat steps around each resume (from /proc/uptime, 10 ms
# resolution). Needs root, QEMU and the test guest (scripts/guest/build.sh); about a minute:
#
#   flock /tmp/strait-heavy.lock python3 bench/resume-first-step.py
import json, os, re, socket, subprocess, threading, time
G=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '.cache', 'guest')
W='/tmp/strait-resume-first-step'; os.makedirs(W, exist_ok=True)
img=f'{W}/disk.img'
subprocess.run(['truncate','-s','64M',img],check=True)
def qemu(name, incoming=None):
    a=['qemu-system-x86_64','-accel','tcg','-machine','pc','-nodefaults','-no-user-config','-smp','1','-m','256M',
       '-blockdev',f'driver=raw,node-name=d0,file.driver=file,file.filename={img}','-device','virtio-blk-pci,drive=d0,id=vda',
       '-kernel',f'{G}/vmlinuz','-initrd',f'{G}/initramfs.gz','-append','console=ttyS0 quiet panic=-1 strait.test=migrate strait.arg=60',
       '-display','none','-serial','stdio','-monitor','none','-no-reboot','-qmp',f'unix:{W}/{name}.qmp,server=on,wait=off']
    if incoming: a+=['-incoming',incoming]
    p=subprocess.Popen(a,stdout=subprocess.PIPE,stderr=subprocess.DEVNULL)
    lines=[]
    def rd():
        for l in p.stdout:
            lines.append((time.monotonic(), l.decode(errors='replace').strip()))
    threading.Thread(target=rd,daemon=True).start()
    return p,lines
class QMP:
    def __init__(s,path):
        for _ in range(100):
            try:
                s.s=socket.socket(socket.AF_UNIX); s.s.connect(path); break
            except OSError: time.sleep(0.1)
        s.f=s.s.makefile('rw'); s.f.readline(); s.cmd('qmp_capabilities')
    def cmd(s,c,**a):
        s.f.write(json.dumps({'execute':c,'arguments':a})+'\n'); s.f.flush()
        while True:
            r=json.loads(s.f.readline())
            if 'return' in r or 'error' in r: return r
def hb(lines):
    out=[]
    for t,l in lines:
        m=re.match(r'STRAIT-HB i=(\d+) up=([\d.]+)$',l)
        if m: out.append((t,int(m.group(1)),float(m.group(2))))
    return out
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
while q.cmd('query-migrate')['return'].get('status')!='completed': time.sleep(0.05)
while qd.cmd('query-status')['return']['status']!='running': time.sleep(0.01)
t=time.monotonic(); time.sleep(3)
s=hb(sl)[-4:]; d=hb(dl)[:4]; seq=s+d
print('migration: steps ms (guest clock), the resume between #3 and #4:', [round((seq[i+1][2]-seq[i][2])*1000) for i in range(len(seq)-1)], 'first dst line', dl[:2])
for p in (src,dst): p.kill()
