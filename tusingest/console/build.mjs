// Builds the console's one script and one stylesheet into static/ (committed, packaged with the wheel).
// Deterministic: the same package-lock.json gives the same bytes (tests/e2e/test_console.py checks it).
import * as esbuild from 'esbuild'

const outdir = process.argv[2] ?? 'static'
const common = { bundle: true, minify: true, logLevel: 'warning', legalComments: 'eof', charset: 'utf8' }

await esbuild.build({
  ...common,
  entryPoints: ['src/console.js'],
  outfile: `${outdir}/console.js`,
  format: 'iife',
  target: ['es2020'],
})
await esbuild.build({ ...common, entryPoints: ['src/console.css'], outfile: `${outdir}/console.css` })
