#!/usr/bin/env python3
"""The README's promises: it opens with the two set-up commands (run the
main job, run the tests), .ci/run runs the test command verbatim, the main
job runs the embedded default pipeline, and every file it links to exists."""
import os
import re
import sys

root = sys.argv[1]
readme = open(os.path.join(root, 'README.md')).read()
ci = open(os.path.join(root, '.ci', 'run')).read()

blocks = re.findall(r'```sh\n(.*?)\n```', readme, re.S)
assert len(blocks) >= 2, 'the README must open with two sh blocks'
run_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
assert run_cmd.startswith('apt-get update') and 'pipelines/demo.pipeline' in run_cmd, run_cmd
assert os.path.exists(os.path.join(root, 'pipelines', 'demo.pipeline'))
assert test_cmd.startswith('apt-get update') and 'meson test' in test_cmd, test_cmd
assert test_cmd in ci, '.ci/run does not run the README test command verbatim'

# The test command installs everything the run command installs.
def packages(cmd):
    m = re.search(r'apt-get install -y ([^&]*)', cmd)
    return set(m.group(1).split())
missing = packages(run_cmd) - packages(test_cmd)
assert not missing, 'packages in the run command but not the test command: %s' % missing

for link in re.findall(r'\]\(([^)#]+)\)', readme) + re.findall(r'`(docs/[^`]+\.md)`', readme):
    if '://' in link:
        continue
    assert os.path.exists(os.path.join(root, link)), 'README links to a missing file: ' + link
print('README: 2 set-up commands, .ci/run in step, links resolve')
