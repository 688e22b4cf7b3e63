// Serve a built OHIF viewer (@ohif/app's dist/) with a same-origin proxy to a DICOMweb server.
//
//   node ohif_serve.mjs DIST_DIR PORT DICOMWEB_ROOT
//   e.g. node ohif_serve.mjs /tmp/ohif/package/dist 18300 http://127.0.0.1:18042/dicom-web
//
// - /dicom-web/... is forwarded to DICOMWEB_ROOT/... (Orthanc 1.10 sends no CORS headers, so the
//   viewer must reach it on its own origin);
// - /app-config.js is the shipped one with its dicomweb data source pointed at /dicom-web
//   (qido/wado/wado-uri roots) and staticWado off; dist/ itself is not modified;
// - any other path that is not a file gets index.html (the viewer routes on the client).
// Listens on 127.0.0.1 only. Stops on SIGTERM/SIGINT.

import { createReadStream, readFileSync, statSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const [dist, portText, dicomwebRoot] = process.argv.slice(2);
if (!dist || !portText || !dicomwebRoot) {
  console.error('usage: node ohif_serve.mjs DIST_DIR PORT DICOMWEB_ROOT');
  process.exit(2);
}
const port = Number(portText);
const upstream = new URL(dicomwebRoot.replace(/\/$/, ''));
const ownRoot = `http://127.0.0.1:${port}/dicom-web`;

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.woff2': 'font/woff2',
  '.map': 'application/json',
  '.txt': 'text/plain; charset=utf-8',
};

/** The shipped app-config.js with the default data source pointed at our proxy. */
function appConfig() {
  const text = readFileSync(path.join(dist, 'app-config.js'), 'utf8');
  const patched = text
    .replace(/(wadoUriRoot|qidoRoot|wadoRoot):\s*'[^']*'/g, `$1: '${ownRoot}'`)
    .replace(/staticWado:\s*true/g, 'staticWado: false')
    // Orthanc 1.10's DICOMweb plugin has no /thumbnail resource (a 404 per series): OHIF
    // renders thumbnails from the WADO-RS pixel data instead.
    .replace(/thumbnailRendering:\s*'[^']*'/g, "thumbnailRendering: 'wadors'");
  if (!patched.includes(ownRoot)) {
    throw new Error('app-config.js has no wadoUriRoot/qidoRoot/wadoRoot to point at the proxy');
  }
  return patched;
}

/** Forward one request to the DICOMweb server, streaming both ways. */
function proxy(req, res) {
  const target = new URL(upstream.pathname + req.url.slice('/dicom-web'.length), upstream);
  const headers = { ...req.headers, host: upstream.host };
  const upstreamReq = http.request(target, { method: req.method, headers }, upstreamRes => {
    if ((upstreamRes.statusCode ?? 502) >= 400) {
      console.log(`failed request: ${req.method} ${req.url} -> ${upstreamRes.statusCode}`);
    }
    res.writeHead(upstreamRes.statusCode ?? 502, upstreamRes.headers);
    upstreamRes.pipe(res);
  });
  upstreamReq.on('error', err => {
    res.writeHead(502, { 'content-type': 'text/plain' });
    res.end(`proxy error: ${err.message}`);
  });
  req.pipe(upstreamReq);
}

/** A file of dist/, or index.html for client-side routes. */
function serveStatic(req, res) {
  const urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  let file = path.normalize(path.join(dist, urlPath));
  if (!file.startsWith(path.normalize(dist))) {
    res.writeHead(403).end();
    return;
  }
  let isFile = false;
  try {
    isFile = statSync(file).isFile();
  } catch {
    isFile = false;
  }
  if (!isFile) {
    file = path.join(dist, 'index.html');
  }
  const type = TYPES[path.extname(file)] ?? 'application/octet-stream';
  res.writeHead(200, {
    'content-type': type,
    // SharedArrayBuffer (used by cornerstone's web workers) needs cross-origin isolation.
    'cross-origin-opener-policy': 'same-origin',
    'cross-origin-embedder-policy': 'require-corp',
  });
  createReadStream(file).pipe(res);
}

const config = appConfig();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/dicom-web/') || req.url === '/dicom-web') {
    proxy(req, res);
  } else if (req.url.split('?')[0] === '/app-config.js') {
    res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
    res.end(config);
  } else {
    serveStatic(req, res);
  }
});
server.listen(port, '127.0.0.1', () => console.log(`OHIF on http://127.0.0.1:${port}/`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
