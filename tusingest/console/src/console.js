// The upload console at /console: Uppy's Dashboard uploading with tus to this server, the result of
// each upload once it is registered, live progress from the session's event stream (or a poll of
// the session status where the server has no stream), and the Storage Elements with their state.
// The page's <body> carries the tus endpoint (data-tus-endpoint), filled in by the server.
import Uppy from '@uppy/core'
import Dashboard from '@uppy/dashboard'
import Tus from '@uppy/tus'

const TOKEN_KEY = 'tusingest.token'
const POLL_MS = 500
const ELEMENTS_REFRESH_MS = 10000
const SETTLED = new Set(['completed', 'failed'])

const endpoint = document.body.dataset.tusEndpoint
const chunkSize = Number(document.body.dataset.chunkSize) || Infinity
const tokenInput = document.getElementById('token')
const resultsBody = document.querySelector('#results tbody')
const elementsBody = document.querySelector('#elements tbody')
const elementsNote = document.getElementById('elements-note')

// -- the token: kept for this tab only, sent as Bearer on every tus and API request ----------------
tokenInput.value = sessionStorage.getItem(TOKEN_KEY) ?? ''
tokenInput.addEventListener('input', () => {
  const token = tokenInput.value.trim()
  if (token) sessionStorage.setItem(TOKEN_KEY, token)
  else sessionStorage.removeItem(TOKEN_KEY)
})

function authHeaders() {
  const token = tokenInput.value.trim()
  return token ? { Authorization: `Bearer ${token}` } : {}
}

function api(path, init = {}) {
  return fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers ?? {}) }, cache: 'no-store' })
}

// -- one row per file: what the browser sent, what the server says, and the registered file ----------
const rows = new Map() // Uppy file id -> row state

function cell(tr, name) {
  return tr.querySelector(`[data-field="${name}"]`)
}

function rowFor(file) {
  let row = rows.get(file.id)
  if (row) return row
  const tr = document.createElement('tr')
  tr.dataset.file = file.name
  for (const name of ['name', 'progress', 'stage', 'file_id', 'storage_element_id', 'sha256_hash', 'storage_filename']) {
    const td = document.createElement('td')
    td.dataset.field = name
    if (['file_id', 'sha256_hash', 'storage_filename'].includes(name)) td.className = 'mono'
    tr.append(td)
  }
  cell(tr, 'name').textContent = file.meta.relativePath || file.name
  const bar = document.createElement('div')
  bar.className = 'bar'
  bar.append(document.createElement('span'))
  const label = document.createElement('div')
  label.className = 'muted'
  cell(tr, 'progress').append(bar, label)
  resultsBody.append(tr)
  row = { tr, sessionId: null, settled: false, watching: false }
  rows.set(file.id, row)
  return row
}

function showProgress(row, uploaded, total) {
  const share = total ? Math.min(1, uploaded / total) : 0
  row.tr.querySelector('.bar > span').style.width = `${(share * 100).toFixed(1)}%`
  row.tr.querySelector('[data-field="progress"] .muted').textContent = `${bytes(uploaded)} of ${bytes(total)} on the server`
}

function showStage(row, stage, bad = false) {
  const td = cell(row.tr, 'stage')
  td.textContent = stage
  td.className = bad ? 'bad' : stage === 'registered' ? 'ok' : ''
  row.tr.dataset.stage = stage
}

function showFile(row, file) {
  row.settled = true
  showStage(row, 'registered')
  showProgress(row, file.size_bytes, file.size_bytes)
  for (const name of ['file_id', 'storage_element_id', 'sha256_hash', 'storage_filename']) {
    cell(row.tr, name).textContent = file[name] ?? ''
  }
  row.tr.dataset.fileId = file.file_id
  refreshElements() // the element's fill has just grown
}

function showFailure(row, error) {
  row.settled = true
  showStage(row, `failed: ${error.error ?? 'error'}: ${error.message ?? ''}`, true)
  row.tr.dataset.error = error.error ?? 'error'
}

function bytes(n) {
  if (n == null) return '?'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1 }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`
}

// -- following one upload session: the event stream, or a poll of its status ------------------------
function sessionIdOf(uploadURL) {
  return new URL(uploadURL, location.href).pathname.split('/').filter(Boolean).pop()
}

function follow(row) {
  if (row.watching || !row.sessionId) return
  row.watching = true
  streamEvents(row).catch(() => null).then((streamed) => {
    if (!streamed && !row.settled) return pollStatus(row)
    return null
  }).finally(() => { row.watching = false })
}

// EventSource cannot send an Authorization header, so the stream is read with fetch(). Resolves true
// when the stream brought the upload to its end, false when the server has no stream (or it broke off).
async function streamEvents(row) {
  const response = await api(`/api/files/upload/session/${row.sessionId}/events`, { headers: { Accept: 'text/event-stream' } })
  if (!response.ok || !(response.headers.get('content-type') ?? '').startsWith('text/event-stream')) return false
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader()
  let buffer = ''
  for (;;) {
    const { value, done } = await reader.read()
    if (done) return row.settled
    buffer += value.replace(/\r\n?/g, '\n')
    let end
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      onEvent(row, parseEvent(block))
      if (row.settled) {
        await reader.cancel()
        return true
      }
    }
  }
}

function parseEvent(block) {
  let event = 'message'
  const data = []
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '')
    if (field === 'event') event = value
    else if (field === 'data') data.push(value)
  }
  let body = null
  try { body = data.length ? JSON.parse(data.join('\n')) : null } catch { body = null }
  return { event, body }
}

function onEvent(row, { event, body }) {
  if (!body) return
  if (event === 'progress') showProgress(row, body.bytes_uploaded, body.bytes_total)
  else if (event === 'status' && !row.settled) showStage(row, body.status)
  else if (event === 'stage' && !row.settled) showStage(row, body.stage, body.stage === 'failed')
  else if (event === 'registered') showFile(row, body)
  else if (event === 'failed') showFailure(row, body)
}

async function pollStatus(row) {
  while (!row.settled) {
    const response = await api(`/api/files/upload/session/${row.sessionId}`)
    if (response.ok) {
      const status = await response.json()
      showProgress(row, status.bytes_uploaded, status.bytes_total)
      if (status.status === 'completed' && status.file) showFile(row, status.file)
      else if (status.status === 'failed') showFailure(row, status.error ?? { error: 'failed' })
      else showStage(row, status.status)
    } else if (response.status !== 429 && response.status < 500) {
      showFailure(row, await errorOf(response))
    }
    if (!row.settled) await new Promise((resolve) => setTimeout(resolve, POLL_MS))
  }
}

async function errorOf(response) {
  try {
    return await response.json()
  } catch {
    return { error: `http_${response.status}`, message: response.statusText }
  }
}

// -- the uploader ---------------------------------------------------------------------------------
const uppy = new Uppy({ autoProceed: false })
  .use(Dashboard, {
    inline: true,
    target: '#dashboard',
    height: 360,
    width: '100%',
    fileManagerSelectionType: 'both', // files and folders; a dropped folder is read recursively
    showProgressDetails: true,
    proudlyDisplayPoweredByUppy: false,
  })
  .use(Tus, {
    endpoint,
    chunkSize,
    retryDelays: [0, 1000, 3000, 5000, 10000],
    removeFingerprintOnSuccess: true,
    headers: () => authHeaders(),
  })

uppy.on('file-added', (file) => rowFor(file))
uppy.on('file-removed', (file) => {
  rows.get(file.id)?.tr.remove()
  rows.delete(file.id)
})
uppy.on('upload-progress', (file, progress) => {
  const row = rowFor(file)
  const uploadURL = uppy.getFile(file.id)?.tus?.uploadUrl
  if (!row.settled) showStage(row, uppy.getFile(file.id)?.isPaused ? 'paused' : 'uploading')
  if (uploadURL && !row.sessionId) {
    row.sessionId = sessionIdOf(uploadURL)
    row.tr.dataset.session = row.sessionId
    follow(row)
  }
  if (!row.watching) showProgress(row, progress.bytesUploaded, progress.bytesTotal)
})
uppy.on('upload-pause', (file, isPaused) => {
  const row = file && rows.get(file.id)
  if (row && !row.settled) showStage(row, isPaused ? 'paused' : 'uploading')
})
uppy.on('upload-success', (file, response) => {
  const row = rowFor(file)
  row.sessionId = row.sessionId ?? sessionIdOf(response.uploadURL)
  row.tr.dataset.session = row.sessionId
  // The completing PATCH already names the file when the finaliser was quick; the stored name
  // and the rest come from the session (stream or status).
  const xhr = response.body?.xhr
  const fileId = xhr?.getResponseHeader('ArtStore-File-Id')
  if (fileId && !row.settled) cell(row.tr, 'file_id').textContent = fileId
  const refused = xhr?.getResponseHeader('ArtStore-Error')
  if (refused) showFailure(row, { error: refused, message: 'refused by the server' })
  if (!row.settled && !row.watching) pollStatus(row)
})
uppy.on('upload-error', (file, error, response) => {
  const row = file && rowFor(file)
  if (!row) return
  const status = response?.status ?? error?.originalResponse?.getStatus?.()
  const text = error?.originalResponse?.getBody?.() ?? error?.message ?? String(error)
  showStage(row, `error${status ? ` ${status}` : ''}: ${String(text).trim()} (retry from the dashboard)`, true)
  row.tr.dataset.error = String(status ?? 'error')
})
uppy.on('upload-retry', (file) => {
  const row = rows.get(typeof file === 'string' ? file : file?.id)
  if (row) { row.settled = false; delete row.tr.dataset.error; showStage(row, 'retrying') }
})

// -- the Storage Elements -------------------------------------------------------------------------
async function refreshElements() {
  try {
    const response = await api('/health/elements')
    if (!response.ok) throw new Error(`HTTP ${response.status}`)
    const body = await response.json()
    elementsBody.replaceChildren(...body.storage_elements.map(elementRow))
    elementsNote.textContent = `version ${body.version ?? '-'}, from ${body.source}${body.discovery_connected ? ', discovery connected' : ''}`
    elementsNote.className = 'muted'
  } catch (error) {
    elementsNote.textContent = `cannot read the Storage Elements: ${error.message}`
    elementsNote.className = 'bad'
  }
}

function elementRow(element) {
  const tr = document.createElement('tr')
  tr.dataset.element = element.element_id
  const fill = element.capacity_bytes ? `${bytes(element.used_bytes)} of ${bytes(element.capacity_bytes)} (${((100 * element.used_bytes) / element.capacity_bytes).toFixed(1)}%)` : `${bytes(element.used_bytes)} (no capacity given)`
  const health = element.healthy == null ? 'not checked yet' : element.healthy ? `healthy${element.latency_ms != null ? `, ${element.latency_ms.toFixed(0)} ms` : ''}` : `unhealthy: ${element.last_error ?? ''}`
  const values = [element.name || element.element_id, element.mode, element.status, fill, health, element.breaker]
  for (const [i, value] of values.entries()) {
    const td = document.createElement('td')
    td.textContent = value ?? ''
    if (i === 4) td.className = element.healthy === false ? 'bad' : element.healthy ? 'ok' : 'muted'
    if (i === 5) td.className = element.breaker === 'closed' ? 'ok' : 'bad'
    tr.append(td)
  }
  return tr
}

document.getElementById('elements-refresh').addEventListener('click', refreshElements)
refreshElements()
setInterval(refreshElements, ELEMENTS_REFRESH_MS)

window.tusingestConsole = { uppy } // for the browser test and for curious operators
