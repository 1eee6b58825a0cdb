// The Node reference tus server for benchmarks/load.py --server node: @tus/server with @tus/file-store, nothing else.
//
//   cd benchmarks/node_reference && npm ci          # once: installs the pinned versions (package-lock.json)
//   STAGING_DIR=/tmp/tusnode node benchmarks/node_reference/server.mjs --host 127.0.0.1 --port 8099
//
// Configuration follows load.py's conventions for the other servers:
//   --host / --port (argv) or HOST / PORT (env; defaults 127.0.0.1 and 8099)
//   STAGING_DIR        the FileStore directory (required): each upload is STAGING_DIR/<id> plus STAGING_DIR/<id>.json
//   MAX_FILE_SIZE_MB   the server's maxSize (default 5120)
// tus endpoint: /files (POST /files/ creates, PATCH /files/<id> appends; creation-with-upload is supported).
// GET /health/ready answers 200 once the server listens, for load.py's readiness poll; it is not part of @tus/server.
// Defaults are kept as they are (MemoryLocker, no expiration, no hooks, no fsync: @tus/file-store has none).
import http from 'node:http';
import process from 'node:process';
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';

function option(name, envName, fallback) {
  const index = process.argv.indexOf(`--${name}`);
  if (index !== -1 && index + 1 < process.argv.length) return process.argv[index + 1];
  return process.env[envName] ?? fallback;
}

const host = option('host', 'HOST', '127.0.0.1');
const port = Number.parseInt(option('port', 'PORT', '8099'), 10);
const directory = process.env.STAGING_DIR;
if (!directory) {
  console.error('STAGING_DIR must be set');
  process.exit(2);
}
const maxSize = Number.parseInt(process.env.MAX_FILE_SIZE_MB ?? '5120', 10) * 1024 * 1024;

const tus = new Server({ path: '/files', datastore: new FileStore({ directory }), maxSize });

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/health/ready') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': '3' });
    res.end('ok\n');
    return;
  }
  tus.handle(req, res).catch((error) => {
    console.error('tus.handle failed:', error);
    if (!res.headersSent) res.writeHead(500);
    res.end();
  });
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 5000).unref();
  });
}

server.listen(port, host, () => {
  console.log(`@tus/server listening on http://${host}:${port}/files, FileStore in ${directory}`);
});
