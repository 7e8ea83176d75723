#!/usr/bin/env python3
"""The floor under any userspace VPN's idle round trip on this machine: two
processes ping-pong one byte over pipes, first after 50 ms asleep (each
must be woken), then at once (both awake). Usage: python3 benches/wakeup.py
(issue 7: on the 2-core Firecracker VM, 49 us idle vs 12 us awake)."""
import os, time, statistics
r1,w1=os.pipe(); r2,w2=os.pipe()
if os.fork()==0:
    while True:
        b=os.read(r1,1)
        if not b or b==b'q': os._exit(0)
        os.write(w2,b)
res=[]; hot=[]
for i in range(200):
    time.sleep(0.05)
    t=time.perf_counter(); os.write(w1,b'x'); os.read(r2,1); res.append(time.perf_counter()-t)
    t=time.perf_counter(); os.write(w1,b'x'); os.read(r2,1); hot.append(time.perf_counter()-t)
os.write(w1,b'q')
print("idle round trip (2 wakes) median us %.1f  p90 %.1f" % (statistics.median(res)*1e6, sorted(res)[180]*1e6))
print("hot  round trip median us %.1f" % (statistics.median(hot)*1e6))
