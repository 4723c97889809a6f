#!/bin/sh
# Stand-in for kd-agent in initrd tests: shows what the real agent would read, then fails with
# code 3 so that /init's restart logic runs.
echo "STAND-IN-KD-AGENT: started with $# argument(s); /proc/cmdline: $(cat /proc/cmdline)"
echo "STAND-IN-KD-AGENT: addresses: $(ip -o -4 addr show scope global | awk '{print $2" "$4}' | tr '\n' ' ')"
exit 3
