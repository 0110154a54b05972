"""A Kubernetes API emulator for the operator end-to-end test, built on kmock's KubernetesEmulator.

kmock serves discovery (its bundled built-in resources, plus every CRD created here), fetch, list and watch
from an in-memory object store. Plain kmock is not enough for kube-rs and kubectl (see ../../TESTING.md in the
shared docs), so this wrapper takes over every write and adds what a real API server does:

- metadata stamping: uid, creationTimestamp, generation (bumped on spec changes), resourceVersion;
- server-side apply (creates when missing), merge / strategic-merge patches, JSON patches (finalizers),
  PUT with resourceVersion conflicts (409), the status and scale subresources;
- deletion with finalizers (deletionTimestamp first), cascading deletion of owned objects (ownerReferences
  uid), delete-collection by label selector;
- label-selector filtering on list and watch, `kind: ...List` with a resourceVersion, `reason: NotFound`.

It does not validate schemas or CEL, own fields, or run pods: the test plays the StatefulSet controller by
writing the StatefulSet status itself.
"""

import asyncio
import copy
import datetime
import itertools
import json
import uuid
from typing import Any

import aiohttp.web
import yaml
from kmock import KubernetesEmulator, Server
from kmock._internal import enums, references

CRD_RESOURCE = references.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure',
                                      'code': code, 'reason': reason, 'message': message}, status=code)


def _merge(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): objects merge, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _json_patch(obj: dict, ops: list) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        parts = [p.replace('~1', '/').replace('~0', '~') for p in op['path'].split('/')[1:]]
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        kind = op['op']
        if kind == 'test':
            current = (parent[int(last)] if isinstance(parent, list) and last.isdigit() and int(last) < len(parent)
                       else parent.get(last) if isinstance(parent, dict) else None)
            if current != op.get('value'):
                raise ValueError(f"test failed at {op['path']}")
        elif kind in ('add', 'replace'):
            if isinstance(parent, list):
                if last == '-':
                    parent.append(op['value'])
                elif kind == 'add':
                    parent.insert(int(last), op['value'])
                else:
                    parent[int(last)] = op['value']
            else:
                parent[last] = op['value']
        elif kind == 'remove':
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
    return obj


def _labels_match(obj: dict, selector: str) -> bool:
    labels = (obj.get('metadata') or {}).get('labels') or {}
    for term in filter(None, (t.strip() for t in selector.split(','))):
        if '!=' in term:
            k, v = term.split('!=', 1)
            if labels.get(k) == v:
                return False
        elif '=' in term:
            k, v = term.replace('==', '=').split('=', 1)
            if labels.get(k) != v:
                return False
        elif term.startswith('!'):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Emulator(KubernetesEmulator):
    """KubernetesEmulator plus the write semantics kube-rs and kubectl rely on."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self._rv = itertools.count(1000)
        # (user agent, RBAC verb, API group, resource[/subresource]) of every resource request, for RBAC checks.
        self.audit: list[tuple[str, str, str, str]] = []

    # ---- helpers -------------------------------------------------------------------------------------

    def _get(self, resource, namespace, name) -> dict | None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    async def _put(self, resource, obj: dict, event: str) -> None:
        meta = obj['metadata']
        key = (resource, meta.get('namespace'), meta['name'])
        if key in self.objects and not self.objects[key].deleted:
            self.objects[key].delete()
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        await self._buses[resource].put({'type': event, 'object': copy.deepcopy(obj)})

    async def _remove(self, resource, obj: dict) -> None:
        meta = obj['metadata']
        key = (resource, meta.get('namespace'), meta['name'])
        self.objects[key].delete()
        await self._buses[resource].put({'type': 'DELETED', 'object': obj})
        # Garbage collection: owned objects go with their owner.
        uid = meta.get('uid')
        for (res, ns, name), o in list(self.objects.items()):
            if o.deleted:
                continue
            refs = (o.raw.get('metadata') or {}).get('ownerReferences') or []
            if any(r.get('uid') == uid for r in refs):
                await self._delete(res, copy.deepcopy(o.raw))

    async def _delete(self, resource, obj: dict) -> dict:
        meta = obj['metadata']
        if meta.get('finalizers'):
            if not meta.get('deletionTimestamp'):
                meta['deletionTimestamp'] = _now()
                meta['resourceVersion'] = str(next(self._rv))
                await self._put(resource, obj, 'MODIFIED')
            return obj
        await self._remove(resource, obj)
        return obj

    def _register_crd(self, crd: dict) -> None:
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        for v in spec.get('versions') or []:
            res = references.resource(spec['group'], v['name'], names['plural'])
            subs = set((v.get('subresources') or {}).keys())
            self.resources[res] = references.ResourceInfo(
                kind=names.get('kind'), singular=names.get('singular'),
                namespaced=spec.get('scope') == 'Namespaced',
                verbs={'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'},
                shortnames=set(names.get('shortNames') or []), categories=set(names.get('categories') or []),
                subresources=subs,
            )

    # ---- request handling ----------------------------------------------------------------------------

    def _record(self, request) -> None:
        method = str(getattr(request.method, 'value', request.method)).upper()
        watch = request.params.get('watch') in ('true', '1')
        verb = {'GET': 'watch' if watch else ('get' if request.name else 'list'), 'POST': 'create',
                'PUT': 'update', 'PATCH': 'patch',
                'DELETE': 'delete' if request.name else 'deletecollection'}.get(method, method.lower())
        resource = request.resource.plural + (f'/{request.subresource}' if request.subresource else '')
        agent = request.headers.get('User-Agent') or request.headers.get('user-agent') or ''
        self.audit.append((agent, verb, request.resource.group or '', resource))

    async def _handle(self, request):
        if request.resource is not None and request.resource.plural:
            self._record(request)
        if request.resource is None or request.method in (enums.method.GET,) and request.subresource != 'scale':
            return await super()._handle(request)
        try:
            async with self._lock:
                return await self._write(request)
        except (ValueError, KeyError) as e:
            return _status(422, 'Invalid', f'{type(e).__name__}: {e}')

    def _body(self, request) -> Any:
        if request.data is not None and not isinstance(request.data, (str, bytes)):
            if not hasattr(request.data, 'getall'):  # not a form
                return request.data
        text = request.text or ''
        return yaml.safe_load(text) if text.strip() else None

    async def _write(self, request):
        res, ns, name, sub = request.resource, request.namespace, request.name, request.subresource
        method = str(request.method.value if hasattr(request.method, 'value') else request.method).upper()
        body = self._body(request)
        ctype = (request.headers.get('Content-Type') or request.headers.get('content-type') or '').split(';')[0]

        if method == 'GET':  # scale subresource
            obj = self._get(res, ns, name)
            if obj is None:
                return _status(404, 'NotFound', f'{res.plural} "{name}" not found')
            return aiohttp.web.json_response(self._scale_of(obj))

        if method == 'POST':
            body = dict(body or {})
            meta = body.setdefault('metadata', {})
            if not meta.get('name') and meta.get('generateName'):
                meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
            name = meta.get('name')
            if ns is not None:
                meta['namespace'] = ns
            if self._get(res, ns, name) is not None:
                return _status(409, 'AlreadyExists', f'{res.plural} "{name}" already exists')
            self._stamp_new(body)
            await self._put(res, body, 'ADDED')
            if res == CRD_RESOURCE:
                self._register_crd(body)
            return aiohttp.web.json_response(body, status=201)

        if method == 'DELETE' and name is None:
            selector = request.params.get('labelSelector', '')
            gone = []
            for (r, o_ns, _), o in list(self.objects.items()):
                if r == res and not o.deleted and (ns is None or o_ns == ns) and _labels_match(o.raw, selector):
                    gone.append(await self._delete(r, copy.deepcopy(o.raw)))
            return aiohttp.web.json_response({'apiVersion': 'v1', 'kind': 'List', 'metadata': {}, 'items': gone})

        current = self._get(res, ns, name)

        if method == 'DELETE':
            if current is None:
                return _status(404, 'NotFound', f'{res.plural} "{name}" not found')
            return aiohttp.web.json_response(await self._delete(res, current))

        if method == 'PUT':
            if current is None:
                return _status(404, 'NotFound', f'{res.plural} "{name}" not found')
            rv = ((body or {}).get('metadata') or {}).get('resourceVersion')
            if rv and rv != current['metadata'].get('resourceVersion'):
                return _status(409, 'Conflict', 'the object has been modified; please apply your changes to the latest version')
            if sub == 'status':
                new = dict(current, status=(body or {}).get('status'))
            elif sub == 'scale':
                new = _merge(current, {'spec': {'replicas': body['spec']['replicas']}})
            else:
                new = dict(body)
                new['metadata'] = dict(current['metadata'], **{k: v for k, v in body['metadata'].items()
                                                               if k not in ('uid', 'creationTimestamp', 'generation')})
                new['status'] = current.get('status')
            return await self._finish_update(res, current, new, sub)

        if method == 'PATCH':
            if 'json-patch' in ctype:
                if current is None:
                    return _status(404, 'NotFound', f'{res.plural} "{name}" not found')
                try:
                    new = _json_patch(current, body or [])
                except (ValueError, IndexError, KeyError) as e:
                    return _status(422, 'Invalid', str(e))
                return await self._finish_update(res, current, new, sub)
            patch = dict(body or {})
            if current is None:
                if 'apply-patch' not in ctype or sub is not None:
                    return _status(404, 'NotFound', f'{res.plural} "{name}" not found')
                meta = patch.setdefault('metadata', {})
                meta['name'] = name
                if ns is not None:
                    meta['namespace'] = ns
                patch.pop('status', None)
                self._stamp_new(patch)
                await self._put(res, patch, 'ADDED')
                if res == CRD_RESOURCE:
                    self._register_crd(patch)
                return aiohttp.web.json_response(patch, status=201)
            if sub == 'status':
                new = dict(current)
                new['status'] = _merge(current.get('status') or {}, patch.get('status') or {}) \
                    if 'apply-patch' not in ctype else patch.get('status')
            elif sub == 'scale':
                new = _merge(current, {'spec': {'replicas': patch['spec']['replicas']}})
            else:
                patch.pop('status', None)
                patch.pop('apiVersion', None) if not patch.get('apiVersion') else None
                new = _merge(current, patch)
            return await self._finish_update(res, current, new, sub)

        return _status(405, 'MethodNotAllowed', f'{method} is not supported here')

    def _stamp_new(self, obj: dict) -> None:
        meta = obj.setdefault('metadata', {})
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = _now()
        meta['resourceVersion'] = str(next(self._rv))
        meta['generation'] = 1
        meta.pop('deletionTimestamp', None)

    async def _finish_update(self, res, current: dict, new: dict, sub: str | None):
        meta = new.setdefault('metadata', {})
        for k in ('uid', 'creationTimestamp', 'name', 'namespace'):
            if k in current['metadata']:
                meta[k] = current['metadata'][k]
        if current['metadata'].get('deletionTimestamp'):
            meta['deletionTimestamp'] = current['metadata']['deletionTimestamp']
        generation = current['metadata'].get('generation', 1)
        if sub != 'status' and new.get('spec') != current.get('spec'):
            generation += 1
        meta['generation'] = generation
        meta['resourceVersion'] = str(next(self._rv))
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            await self._remove(res, new)
        else:
            await self._put(res, new, 'MODIFIED')
        if sub == 'scale':
            return aiohttp.web.json_response(self._scale_of(new))
        return aiohttp.web.json_response(new)

    def _scale_of(self, obj: dict) -> dict:
        meta = obj['metadata']
        return {'apiVersion': 'autoscaling/v1', 'kind': 'Scale',
                'metadata': {'name': meta['name'], 'namespace': meta.get('namespace'),
                             'resourceVersion': meta.get('resourceVersion'), 'uid': meta.get('uid')},
                'spec': {'replicas': (obj.get('spec') or {}).get('replicas', 0)},
                'status': {'replicas': (obj.get('status') or {}).get('replicas', 0),
                           'selector': (obj.get('status') or {}).get('selector', '')}}

    async def _serve_version(self, request):
        doc = await super()._serve_version(request)
        doc['groupVersion'] = doc['groupVersion'].lstrip('/')  # core is "v1", not "/v1"
        return doc

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        selector = request.params.get('labelSelector', '')
        kind = (self.resources[request.resource].kind if request.resource in self.resources else None) or 'Object'
        return {'apiVersion': f'{request.resource.group}/{request.resource.version}'.lstrip('/'),
                'kind': f'{kind}List',
                'metadata': {'resourceVersion': str(next(self._rv))},
                'items': [o for o in result['items'] if _labels_match(o, selector)]}

    async def _serve_watch(self, request):
        selector = request.params.get('labelSelector', '')
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and not _labels_match(event.get('object') or {}, selector):
                continue
            yield event

    async def _render_error(self, exc: Exception):
        response = await super()._render_error(exc)
        if getattr(exc, 'status', None) == 404:
            return _status(404, 'NotFound', str(getattr(exc, 'message', '') or 'not found'))
        return response


INSTANCE: 'Emulator | None' = None


async def serve(port: int, ready: 'asyncio.Future[int]') -> None:
    global INSTANCE
    async with Emulator() as emulator, Server(emulator, port=port) as server:
        INSTANCE = emulator
        ready.set_result(server.port)
        await asyncio.Event().wait()


if __name__ == '__main__':
    import sys

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0, fut))
        print(json.dumps({'port': await fut}), flush=True)
        await task

    asyncio.run(main())
