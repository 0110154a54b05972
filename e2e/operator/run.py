"""Operator end-to-end against the Kubernetes API emulator (emulator.py), driven by real kubectl.

Steps: install the CRD and the sample KefuCluster with `kubectl apply --server-side`; start two
`kefu-operator` replicas with leader election; check that only one leads, that the children appear with
owner references, and that status reaches Ready once the test (playing the StatefulSet controller) marks the
pods ready; `kubectl scale` through the scale subresource; scale down one pod at a time; a config change rolls
a new config hash; the leader dies and the standby takes over; `kubectl delete` runs the finalizer and the
children are garbage-collected. Exits non-zero with a message on the first failed expectation.

Run with `make e2e-operator` (needs `make operator-tools` and a built `target/debug/kefu-operator`).
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.dont_write_bytecode = True  # keep e2e/operator free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TOOLS = os.path.join(ROOT, os.environ.get('TOOLS', '.tools'))
KUBECTL = os.path.join(TOOLS, 'bin', 'kubectl')
OPERATOR = os.path.join(os.environ.get('CARGO_TARGET_DIR', os.path.join(ROOT, 'target')), 'debug', 'kefu-operator')
NS = 'shop'
STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f'[e2e-operator {time.monotonic() - STARTED:5.1f}s] {msg}', flush=True)


def start_emulator() -> int:
    ready: 'list[int]' = []
    event = threading.Event()

    def run() -> None:
        async def main() -> None:
            fut = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(emulator.serve(0, fut))
            ready.append(await fut)
            event.set()
            await task
        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    if not event.wait(20):
        raise SystemExit('emulator did not start')
    return ready[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Fail(Exception):
    pass


def kubectl(*args: str, check: bool = True) -> str:
    p = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise Fail(f'kubectl {" ".join(args)} failed: {p.stderr.strip()}')
    return p.stdout


def get(kind: str, name: str) -> dict | None:
    p = subprocess.run([KUBECTL, '-n', NS, 'get', kind, name, '-o', 'json'], capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout) if p.returncode == 0 else None


def wait_for(what: str, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Fail as e:
            last = e
        if last and not isinstance(last, Exception):
            log(f'ok: {what}')
            return last
        time.sleep(0.2)
    raise Fail(f'timed out waiting for {what} (last: {last!r})')


def condition(kc: dict | None, type_: str) -> tuple[str, str] | None:
    for c in ((kc or {}).get('status') or {}).get('conditions') or []:
        if c['type'] == type_:
            return c['status'], c['reason']
    return None


def mark_pods_ready(replicas: int, revision: str = 'r1') -> None:
    """Play the StatefulSet controller: all `replicas` pods exist and are ready."""
    sts = get('statefulset', 'chat')
    status = {'replicas': replicas, 'readyReplicas': replicas, 'updatedReplicas': replicas,
              'availableReplicas': replicas, 'observedGeneration': sts['metadata'].get('generation', 1),
              'currentRevision': revision, 'updateRevision': revision}
    kubectl('-n', NS, 'patch', 'statefulset', 'chat', '--subresource=status', '--type=merge',
            '-p', json.dumps({'status': status}))


def metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + ' ') or line.startswith(name + '{'):
            return float(line.rsplit(' ', 1)[1])
    return 0.0


def main() -> None:
    if not os.path.exists(OPERATOR):
        raise SystemExit(f'{OPERATOR} missing: build it first (make e2e-operator does)')
    port = start_emulator()
    tmp = tempfile.mkdtemp(prefix='kefu-e2e-operator-')
    kubeconfig = os.path.join(tmp, 'kubeconfig')
    with open(kubeconfig, 'w') as f:
        f.write(f'''apiVersion: v1
kind: Config
clusters: [{{name: emu, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: emu, user: {{}}}}]
contexts: [{{name: emu, context: {{cluster: emu, user: emu, namespace: default}}}}]
current-context: emu
''')
    os.environ['KUBECONFIG'] = kubeconfig
    log(f'emulator on 127.0.0.1:{port}')

    kubectl('apply', '--server-side', '--validate=false', '-f', os.path.join(ROOT, 'crds', 'kefucluster.yaml'))

    operators: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for ident in ('op-a', 'op-b'):
            mport = free_port()
            logf = open(os.path.join(tmp, f'{ident}.log'), 'w')
            env = dict(os.environ, RUST_LOG='info,kube=warn', POD_NAME=ident, POD_NAMESPACE='kefu-system')
            p = subprocess.Popen([OPERATOR, 'run', f'--listen=127.0.0.1:{mport}', '--leader-elect',
                                  '--lease-seconds=3'], env=env, stdout=logf, stderr=subprocess.STDOUT)
            operators[ident] = (p, mport)
            if ident == 'op-a':  # let op-a win the lease so the takeover below is deterministic
                wait_for('op-a leads', lambda: metric(mport, 'kefu_operator_leader') == 1.0)

        _, port_b = operators['op-b']
        wait_for('op-b is up as a standby', lambda: metric(port_b, 'kefu_operator_leader') == 0.0)

        kubectl('-n', NS, 'apply', '--server-side', '--validate=false',
                '-f', os.path.join(ROOT, 'config', 'kefucluster-production.yaml'))
        kc = wait_for('KefuCluster has a finalizer and status',
                      lambda: (k := get('kefucluster', 'chat')) and (k.get('status') or {}).get('conditions') and k)
        assert_eq(kc['metadata'].get('finalizers'), ['kefu.io/cleanup'], 'finalizer')
        uid = kc['metadata']['uid']
        for kind, name in [('configmap', 'chat-config'), ('service', 'chat-peers'), ('service', 'chat'),
                           ('statefulset', 'chat'), ('poddisruptionbudget', 'chat'),
                           ('horizontalpodautoscalers.v2.autoscaling', 'chat'), ('ingress', 'chat')]:
            obj = wait_for(f'{kind}/{name} exists', lambda kind=kind, name=name: get(kind, name))
            refs = obj['metadata'].get('ownerReferences') or []
            assert_eq([r['uid'] for r in refs], [uid], f'{kind}/{name} owner')
        sts = get('statefulset', 'chat')
        assert_eq(sts['spec']['replicas'], 3, 'initial replicas')
        hash1 = sts['spec']['template']['metadata']['annotations']['kefu.io/config-hash']
        assert_eq(condition(get('kefucluster', 'chat'), 'Ready'), ('False', 'ReplicasNotReady'), 'Ready before pods')
        assert_eq(metric(port_b, 'kefu_operator_reconciles_total'), 0.0, 'standby reconciled nothing')

        mark_pods_ready(3)
        wait_for('Ready=True', lambda: condition(get('kefucluster', 'chat'), 'Ready') == ('True', 'AllReplicasReady'))
        kc = get('kefucluster', 'chat')
        assert_eq((kc['status']['replicas'], kc['status']['readyReplicas']), (3, 3), 'status counts')
        assert_eq(condition(kc, 'Progressing'), ('False', 'Stable'), 'Progressing')
        events = json.loads(kubectl('-n', NS, 'get', 'events.v1.events.k8s.io', '-o', 'json'))['items']
        notes = [e.get('note', '') for e in events if (e.get('regarding') or {}).get('name') == 'chat']
        if not any(n.startswith('Ready=True') for n in notes):
            raise Fail(f'no Event for the Ready flip: {notes}')
        log(f'ok: {len(notes)} events on transitions, e.g. {notes[-1]!r}')

        kubectl('-n', NS, 'scale', 'kefucluster', 'chat', '--replicas=5')
        wait_for('scale subresource → StatefulSet 5', lambda: get('statefulset', 'chat')['spec']['replicas'] == 5)
        mark_pods_ready(5)
        wait_for('Ready at 5', lambda: condition(get('kefucluster', 'chat'), 'Ready') == ('True', 'AllReplicasReady'))

        kubectl('-n', NS, 'scale', 'kefucluster', 'chat', '--replicas=3')
        wait_for('scale-down steps to 4 first', lambda: get('statefulset', 'chat')['spec']['replicas'] == 4)
        time.sleep(1.0)
        assert_eq(get('statefulset', 'chat')['spec']['replicas'], 4, 'holds at 4 while pod 4 drains')
        mark_pods_ready(4)
        # The operator requeues every 10 s while stepping down; nudge it with an unrelated label change.
        kubectl('-n', NS, 'label', 'kefucluster', 'chat', 'e2e/nudge=1')
        wait_for('then to 3', lambda: get('statefulset', 'chat')['spec']['replicas'] == 3, timeout=20)
        mark_pods_ready(3)

        kubectl('-n', NS, 'patch', 'kefucluster', 'chat', '--type=merge',
                '-p', json.dumps({'spec': {'config': {'routing': {'strategy': 'least-loaded'}}}}))
        wait_for('config change rolls a new hash', lambda: get('statefulset', 'chat')['spec']['template']['metadata']
                 ['annotations']['kefu.io/config-hash'] != hash1)
        assert 'least-loaded' in get('configmap', 'chat-config')['data']['kefu.toml']

        # Leader dies: the standby takes over within the lease duration and reconciles.
        p_a, _ = operators.pop('op-a')
        p_a.kill()
        p_a.wait()
        wait_for('op-b takes over the lease', lambda: metric(port_b, 'kefu_operator_leader') == 1.0, timeout=20)
        kubectl('-n', NS, 'patch', 'kefucluster', 'chat', '--type=merge', '-p', '{"spec":{"image":"kefu-node:e2e"}}')
        wait_for('new leader applies changes', lambda: get('statefulset', 'chat')['spec']['template']['spec']
                 ['containers'][0]['image'] == 'kefu-node:e2e')

        kubectl('-n', NS, 'delete', 'kefucluster', 'chat', '--wait=false')
        wait_for('finalizer released and KefuCluster gone', lambda: get('kefucluster', 'chat') is None)
        for kind, name in [('statefulset', 'chat'), ('configmap', 'chat-config'), ('service', 'chat')]:
            wait_for(f'{kind}/{name} garbage-collected', lambda kind=kind, name=name: get(kind, name) is None)
        check_rbac()
        failures = metric(port_b, 'kefu_operator_reconcile_failures_total')
        log(f'ok: all steps passed (standby reconcile failures: {failures})')
    except (Fail, AssertionError) as e:
        for ident, (p, _) in operators.items():
            print(f'--- {ident} log ---', file=sys.stderr)
            print(open(os.path.join(tmp, f'{ident}.log')).read()[-4000:], file=sys.stderr)
        raise SystemExit(f'e2e-operator FAILED: {e}')
    finally:
        for p, _ in operators.values():
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def check_rbac() -> None:
    """Every request the operator made must be allowed by the chart's ClusterRole + leader Role (and nothing in
    those roles may go unused by the whole run, apart from verbs only a real cluster exercises)."""
    import yaml
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(TOOLS, 'helm', 'cache'),
               XDG_CONFIG_HOME=os.path.join(TOOLS, 'helm', 'config'), XDG_DATA_HOME=os.path.join(TOOLS, 'helm', 'data'))
    rendered = subprocess.run([os.path.join(TOOLS, 'bin', 'helm'), 'template', 'kefu',
                               os.path.join(ROOT, 'charts', 'kefu-operator'), '-n', 'kefu-system'],
                              capture_output=True, text=True, check=True, env=env).stdout
    allowed = set()
    for doc in yaml.safe_load_all(rendered):
        if doc and doc.get('kind') in ('ClusterRole', 'Role'):
            for rule in doc.get('rules') or []:
                for g in rule.get('apiGroups', []):
                    for r in rule.get('resources', []):
                        for v in rule.get('verbs', []):
                            allowed.add((g, r, v))
    used = {(g, r, v) for agent, v, g, r in emulator.INSTANCE.audit if not agent.startswith('kubectl')}
    if not used:
        raise Fail('no operator requests were recorded (kubectl user agent changed?)')
    missing = sorted(u for u in used if u not in allowed)
    if missing:
        raise Fail(f'the chart RBAC does not allow what the operator did: {missing}')
    log(f'ok: chart RBAC allows all {len(used)} (group, resource, verb) the operator used')


def assert_eq(actual, expected, what: str) -> None:
    if actual != expected:
        raise Fail(f'{what}: expected {expected!r}, got {actual!r}')


if __name__ == '__main__':
    main()
