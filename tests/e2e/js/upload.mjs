#!/usr/bin/env node
// One tus-js-client upload, driven by tests/e2e/test_tus_js_client.py.
//
//   node upload.mjs '<json spec>'      or      echo '<json spec>' | node upload.mjs
//
// The spec (only `endpoint` and `file` are required):
//   endpoint             the creation URL, e.g. http://127.0.0.1:8020/files/
//   file                 path of the file to upload
//   input                "stream" (fs.createReadStream, the default) or "buffer" (fs.readFileSync)
//   chunkSize            bytes per PATCH (default: the whole file)
//   parallelUploads      > 1 uploads that many partial uploads and concatenates them (tus concatenation)
//   metadata             {key: value} sent as Upload-Metadata
//   abortAfterBytes      call upload.abort() from onProgress once this many bytes were sent
//   uploadUrl            resume this upload (tus-js-client HEADs it and continues from its offset)
//   urlStorage           path of a JSON file for FileUrlStorage: the upload's URL is remembered there
//   findPreviousUploads  look the file up in urlStorage and resume the most recent previous upload
//   retryDelays          default [0, 100, 300]
//   timeoutMs            give up (exit 3) after this long, default 15000
//
// Prints exactly one JSON line on stdout:
//   {ok, aborted, url, bytesUploaded, bytesTotal, resumedFrom, previousUploads, tusJsClient,
//    requests: [{method, url, status, uploadOffset, uploadConcat, ...}], errors: [{message, status, body, ...}]}
// and exits 0 on success or a requested abort, 1 on an upload error, 2 on a bad spec, 3 on timeout.
import fs from 'node:fs'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)

function emit(result, code) {
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(code))
}

function describeError(err) {
  const out = { message: String(err && err.message ? err.message : err) }
  const req = err && err.originalRequest
  const res = err && err.originalResponse
  if (req) {
    out.method = req.getMethod()
    out.url = req.getURL()
  }
  if (res) {
    out.status = res.getStatus()
    out.body = res.getBody()
    out.uploadOffset = res.getHeader('Upload-Offset') ?? null
  }
  if (err && err.causingError) out.cause = String(err.causingError.message ?? err.causingError)
  return out
}

async function readSpec() {
  if (process.argv[2]) return JSON.parse(process.argv[2])
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

let tus
let tusVersion
try {
  tus = require('tus-js-client')
  tusVersion = require('tus-js-client/package.json').version
} catch (err) {
  emit({ ok: false, errors: [{ message: `tus-js-client is not installed (run npm ci in tests/e2e/js): ${err.message}` }] }, 2)
}

let spec
try {
  spec = await readSpec()
  if (!spec.endpoint || !spec.file) throw new Error('the spec needs endpoint and file')
} catch (err) {
  emit({ ok: false, errors: [{ message: `bad spec: ${err.message}` }] }, 2)
}

if (tus && spec) {
  const result = {
    ok: false,
    aborted: false,
    url: null,
    bytesUploaded: 0,
    bytesTotal: fs.statSync(spec.file).size,
    resumedFrom: null,
    previousUploads: null,
    tusJsClient: tusVersion,
    node: process.version,
    requests: [],
    errors: [],
  }
  const input = spec.input === 'buffer' ? fs.readFileSync(spec.file) : fs.createReadStream(spec.file)

  let upload
  const options = {
    endpoint: spec.endpoint,
    retryDelays: spec.retryDelays ?? [0, 100, 300],
    metadata: spec.metadata ?? {},
    parallelUploads: spec.parallelUploads ?? 1,
    onAfterResponse(req, res) {
      const entry = {
        method: req.getMethod(),
        url: req.getURL(),
        status: res.getStatus(),
        uploadOffset: res.getHeader('Upload-Offset') ?? null,
        uploadLength: res.getHeader('Upload-Length') ?? null,
        uploadConcat: res.getHeader('Upload-Concat') ?? null,
        requestOffset: req.getHeader('Upload-Offset') ?? null,
        requestConcat: req.getHeader('Upload-Concat') ?? null,
      }
      if (res.getStatus() >= 400) entry.body = res.getBody()
      result.requests.push(entry)
      if (result.resumedFrom === null && entry.method === 'HEAD' && entry.status === 200 && entry.uploadOffset !== null) {
        result.resumedFrom = Number(entry.uploadOffset)
      }
    },
    onProgress(bytesSent, bytesTotal) {
      result.bytesUploaded = bytesSent
      result.bytesTotal = bytesTotal
      if (spec.abortAfterBytes != null && !result.aborted && bytesSent >= spec.abortAfterBytes) {
        result.aborted = true
        result.url = upload.url
        upload.abort().then(
          () => emit(result, 0),
          (err) => {
            result.errors.push(describeError(err))
            emit(result, 1)
          },
        )
      }
    },
    onError(err) {
      result.errors.push(describeError(err))
      result.url = upload.url
      emit(result, 1)
    },
    onSuccess() {
      if (result.aborted) return
      result.ok = true
      result.url = upload.url
      result.bytesUploaded = result.bytesTotal
      emit(result, 0)
    },
  }
  if (spec.headers) options.headers = spec.headers // e.g. Authorization: Bearer <token>
  if (spec.chunkSize != null) options.chunkSize = spec.chunkSize
  if (spec.uploadUrl) options.uploadUrl = spec.uploadUrl
  if (spec.urlStorage) {
    if (!fs.existsSync(spec.urlStorage)) fs.writeFileSync(spec.urlStorage, '{}')
    options.urlStorage = new tus.FileUrlStorage(spec.urlStorage)
  }

  setTimeout(() => {
    result.errors.push({ message: `timed out after ${spec.timeoutMs ?? 15000} ms` })
    result.url = upload.url
    emit(result, 3)
  }, spec.timeoutMs ?? 15000).unref()

  upload = new tus.Upload(input, options)
  try {
    if (spec.findPreviousUploads) {
      const previous = await upload.findPreviousUploads()
      result.previousUploads = previous.length
      if (previous.length > 0) {
        previous.sort((a, b) => String(b.creationTime).localeCompare(String(a.creationTime)))
        upload.resumeFromPreviousUpload(previous[0])
      }
    }
    upload.start()
  } catch (err) {
    result.errors.push(describeError(err))
    emit(result, 1)
  }
}
