// Sends tracks and identifies to a schematic-sync daemon through Segment's
// official Node library (`@segment/analytics-node`), unchanged: only its
// documented settings and events are used.
//
//     node node_client.mjs URL WRITE_KEY RUN_ID COUNT [--batch-size N]
//
// Each argument may come from the environment instead (SEGMENT_HOST,
// SEGMENT_WRITE_KEY, CLIENT_RUN_ID, CLIENT_COUNT, CLIENT_BATCH_SIZE). The
// library is loaded from the folder in SEGMENT_NODE_DIR (a folder where
// `npm install @segment/analytics-node` ran), by default
// `target/test-clients/node` of this repository.
//
// For i in 0..COUNT it sends, interleaved:
// - a track: userId `${run}-u${i}`, event NAMES[i % 4], properties
//   (order_id, revenue, currency, products), and context.groupId
//   `${run}-g${i % 3}` when i is even (none when odd);
// - an identify: userId `${run}-u${i}`, traits name `User ${i}`,
//   company_name `Company ${i % 3}`, email, plan ("pro" for even i, else
//   "free"), seats i, and context.groupId `${run}-g${i % 3}`.
// `tests/clients.rs` derives the expected Schematic events from the same rules.
//
// The library batches (`flushAt` messages at most a request, the rest after
// `flushInterval` or at `closeAndFlush`). Every request it makes is seen
// through its `http_request` / `http_response` events; at the end one JSON
// line goes to stdout: {"library", "version", "messages", "requests",
// "batch_sizes", "statuses", "errors"}. The exit code is non-zero if the
// library reported any error (an `error` event or a callback error) or if
// not every message was acknowledged by a 2xx.

import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const NAMES = ['Order Completed', 'Checkout Started', 'Product Added', 'orderShipped']

function parseArgs(argv) {
  const positional = []
  let batchSize = Number(process.env.CLIENT_BATCH_SIZE || 10)
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--batch-size') {
      batchSize = Number(argv[++i])
    } else {
      positional.push(argv[i])
    }
  }
  const env = process.env
  const args = {
    url: positional[0] ?? env.SEGMENT_HOST,
    writeKey: positional[1] ?? env.SEGMENT_WRITE_KEY,
    runId: positional[2] ?? env.CLIENT_RUN_ID,
    count: Number(positional[3] ?? env.CLIENT_COUNT),
    batchSize,
  }
  const missing = ['url', 'writeKey', 'runId'].filter((k) => !args[k])
  if (!Number.isInteger(args.count) || args.count < 0) missing.push('count')
  if (!Number.isInteger(batchSize) || batchSize < 1) missing.push('--batch-size')
  if (missing.length) {
    console.error(`usage: node node_client.mjs URL WRITE_KEY RUN_ID COUNT [--batch-size N]; missing or bad: ${missing.join(', ')}`)
    process.exit(2)
  }
  return args
}

function loadLibrary() {
  const here = path.dirname(fileURLToPath(import.meta.url))
  const dir = process.env.SEGMENT_NODE_DIR || path.join(here, '..', '..', 'target', 'test-clients', 'node')
  // Resolve from that folder: an ES module's bare import only looks in
  // node_modules folders above this script.
  const require = createRequire(path.join(path.resolve(dir), 'package.json'))
  const pkg = require('@segment/analytics-node/package.json')
  return { Analytics: require('@segment/analytics-node').Analytics, version: pkg.version }
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  const { Analytics, version } = loadLibrary()
  const run = args.runId
  const errors = []
  const batchSizes = []
  const statuses = []
  let acknowledged = 0

  const analytics = new Analytics({
    writeKey: args.writeKey,
    host: args.url,
    flushAt: args.batchSize,
    flushInterval: 500,
    maxRetries: 3,
    httpRequestTimeout: 15000,
  })
  analytics.on('http_request', (req) => {
    batchSizes.push(JSON.parse(req.body).batch.length)
  })
  analytics.on('http_response', (res) => {
    statuses.push(res.status)
    if (res.status < 200 || res.status >= 300) {
      errors.push(`HTTP ${res.status} ${res.statusText} from ${res.url}`)
    }
  })
  analytics.on('error', (err) => {
    errors.push(`error event ${err.code}: ${err.reason?.message ?? err.reason}`)
  })
  const done = (what) => (err) => {
    if (err) {
      errors.push(`${what}: ${err.message ?? err}`)
    } else {
      acknowledged++
    }
  }

  for (let i = 0; i < args.count; i++) {
    const userId = `${run}-u${i}`
    const group = `${run}-g${i % 3}`
    analytics.track(
      {
        userId,
        event: NAMES[i % NAMES.length],
        properties: {
          order_id: `${run}-order-${i}`,
          revenue: 10.5 + i,
          currency: 'USD',
          products: [{ sku: `sku-${i}`, quantity: 1 + (i % 2) }],
        },
        ...(i % 2 === 0 ? { context: { groupId: group } } : {}),
      },
      done(`track ${i}`)
    )
    analytics.identify(
      {
        userId,
        traits: {
          name: `User ${i}`,
          company_name: `Company ${i % 3}`,
          email: `u${i}@example.com`,
          plan: i % 2 === 0 ? 'pro' : 'free',
          seats: i,
        },
        context: { groupId: group },
      },
      done(`identify ${i}`)
    )
  }
  await analytics.closeAndFlush({ timeout: 30000 })

  const messages = 2 * args.count
  const sent = batchSizes.reduce((a, b) => a + b, 0)
  if (sent !== messages) errors.push(`${messages} messages queued, ${sent} sent in requests`)
  if (acknowledged !== messages) errors.push(`${acknowledged} of ${messages} messages acknowledged`)
  const summary = {
    library: '@segment/analytics-node',
    version,
    messages,
    requests: batchSizes.length,
    batch_sizes: batchSizes,
    statuses,
    errors,
  }
  console.log(JSON.stringify(summary))
  for (const e of errors) console.error(`node client error: ${e}`)
  process.exitCode = errors.length ? 1 : 0
}

main().catch((err) => {
  console.error(`node client failed: ${err?.stack ?? err}`)
  process.exit(1)
})
