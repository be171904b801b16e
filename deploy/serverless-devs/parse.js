// Resolve an s.yaml as `s deploy` does, offline, with Serverless Devs' own parser (@serverless-devs/parse-spec):
// variables, YAML anchors, `${env()}`, `${vars.x}`, `${config('AccountID')}` (from ~/.s/access.yaml).
// Prints one JSON line: {"<resource>": {component, props}}. Used by tests/unit/test_deploy.py.
const ParseSpec = require('@serverless-devs/parse-spec').default;

(async () => {
  const spec = await new ParseSpec(process.argv[2], { argv: ['deploy'] }).start();
  const out = {};
  for (const step of spec.steps) out[step.projectName] = { component: step.component, props: step.props };
  process.stdout.write('\n' + JSON.stringify(out) + '\n');
})().catch((error) => {
  process.stderr.write(String((error && error.message) || error) + '\n');
  process.exit(1);
});
