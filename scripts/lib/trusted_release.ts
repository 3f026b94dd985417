/**
 * What fetch and verify may trust of a published release: the boot-v* release asked for, its
 * SHA256SUMS (under --trust signed by a trusted key, with the provenance it lists), the
 * manifest.json it lists, and the chosen targets' files with their listed checksums. It reads
 * the index through release_index.ts and refuses what does not hold together; it never writes
 * to a release, downloads a boot file, or lets an unlisted copy decide what boots.
 */
import { type Release } from "../../types/forgejo.ts";
import {
  ASSET_NAME,
  INDEX_NAMES,
  type Manifest,
  MANIFEST_NAME,
  type ManifestAsset,
  SIGNATURE_NAME,
  SUMS_NAME,
} from "../../types/manifest.ts";
import { ENVELOPE_NAME, type Statement, STATEMENT_NAME } from "../../types/provenance.ts";
import { ReleaseError, type Run } from "./run.ts";
import { type Forgejo } from "./forgejo.ts";
import { type TrustedKey, verifySums } from "./sshsig.ts";
import { checkSubjects, readStatement, verifyEnvelope } from "./provenance.ts";
import { parseSums, type RemoteIndex, unionManifest } from "./release_index.ts";

/** `latest` is the newest published boot-v* release: never a draft, pre-release or boot-dev. */
export async function findBootRelease(forgejo: Forgejo, tag: string): Promise<Release> {
  if (tag === "latest") {
    const published = await forgejo.releases.list({ draft: false, prerelease: false });
    const found = published.find((r) =>
      r.tag_name.startsWith("boot-v") && !r.draft && !r.prerelease
    );
    if (!found) {
      throw new ReleaseError(`${forgejo.repo} has no published boot-v* release yet; pass --tag`);
    }
    return found;
  }
  const release = await forgejo.releases.byTag(tag);
  if (!release) {
    throw new ReleaseError(
      `${forgejo.repo} has no release ${tag} that this token can see; check --tag`,
    );
  }
  // Forgejo matches tags case-insensitively; any other answer is a release served in its place.
  if (release.tag_name.toLowerCase() !== tag.toLowerCase()) {
    throw new ReleaseError(
      `asked for release ${tag}, the server answered with ${release.tag_name}: refusing it; nothing was changed: check --server`,
    );
  }
  if (release.draft) {
    throw new ReleaseError(`${tag} is still a draft: publish it before booting from it`);
  }
  return release;
}

/**
 * SHA256SUMS as the release holds it, the root every file is checked against. With --trust
 * its signature must verify against a trusted key first; without, one line says that only
 * integrity, not authenticity, is checked. With --trust, the provenance it lists must agree
 * with it too.
 */
export async function authenticSums(
  run: Run,
  index: RemoteIndex,
  tag: string,
  trust: TrustedKey[] | undefined,
): Promise<Map<string, string>> {
  if (index.sums.length !== 1) {
    throw new ReleaseError(
      index.sums.length === 0
        ? `${tag} has no ${SUMS_NAME}: it was not finished, or not made to be verified; nothing can be checked`
        : `${tag} holds ${SUMS_NAME} ${index.sums.length} times: it is not finished; fetch it once it has one`,
    );
  }
  const sums = index.sums[0].text;
  if (trust) {
    const signature = index.signatures.at(-1);
    if (!signature) {
      throw new ReleaseError(
        `${tag} has no ${SIGNATURE_NAME}, so nothing proves who made its ${SUMS_NAME}; nothing was changed: publish it with a signing key, or drop --trust to check integrity only`,
      );
    }
    const signer = await verifySums(trust, new TextEncoder().encode(sums), signature.text);
    run.log(`${tag}: ${SUMS_NAME} is signed by ${signer.principal} (${signer.fingerprint})`);
  } else {
    run.log(
      `${tag}: files are checked against its ${SUMS_NAME} (integrity), but not who made it (authenticity): pass --trust FILE to require its signature`,
    );
  }
  const listed = plainNames(parseSums(sums), tag);
  if (trust) await checkProvenance(run, index, listed, tag, trust);
  return listed;
}

/**
 * The provenance an authentic SHA256SUMS lists: the copy with that checksum, attesting exactly
 * the files SHA256SUMS lists, and an envelope signed by a trusted key. A release made before
 * provenance lists none, and has none to check.
 */
async function checkProvenance(
  run: Run,
  index: RemoteIndex,
  sums: Map<string, string>,
  tag: string,
  trust: TrustedKey[],
): Promise<void> {
  for (const name of [STATEMENT_NAME, ENVELOPE_NAME].filter((name) => sums.has(name))) {
    const copy = index.provenances.find((p) => p.name === name && p.sha256 === sums.get(name));
    if (!copy) {
      throw new ReleaseError(
        `${name} of ${tag} does not match its ${SUMS_NAME}: the release was changed, refusing to trust it`,
      );
    }
    let statement: Statement;
    if (copy.name === ENVELOPE_NAME) {
      const signed = await verifyEnvelope(copy.bytes, trust);
      run.log(`${tag}: ${name} is signed by ${signed.principal} (${signed.keyid})`);
      statement = signed.statement;
    } else {
      statement = readStatement(copy.name, copy.bytes);
    }
    const problems = checkSubjects(statement, sums, INDEX_NAMES);
    if (problems.length > 0) {
      throw new ReleaseError(
        `${name} of ${tag} does not agree with its ${SUMS_NAME}: ${problems[0]}${
          problems.length > 1 ? ` (and ${problems.length - 1} more)` : ""
        }; the release is inconsistent, refusing to trust it`,
      );
    }
  }
}

/**
 * The manifest.json that says what a release boots: the copy SHA256SUMS lists (only that exact
 * copy is believed), else the union of the copies (releases from before SHA256SUMS listed it).
 * `signed`: SHA256SUMS was checked against --trust; then it must list manifest.json, or an
 * unsigned file would decide what boots. The manifest must name the release's own tag: one
 * naming another is an older release served again under a new tag. `command` words the fix.
 */
export function releaseManifest(
  index: RemoteIndex,
  sums: Map<string, string>,
  tag: string,
  { signed, command }: { signed: boolean; command: "fetch" | "verify" },
): Manifest | undefined {
  const listed = sums.get(MANIFEST_NAME);
  if (listed === undefined && signed) {
    throw new ReleaseError(
      `the signed ${SUMS_NAME} of ${tag} does not list ${MANIFEST_NAME}, so nothing signed says how to boot it: refusing it under --trust; nothing was changed: publish the release again with a signing key`,
    );
  }
  const manifest = listed === undefined
    ? unionManifest(index)
    : index.manifests.find((copy) => copy.sha256 === listed)?.manifest;
  if (listed !== undefined && !manifest) {
    throw new ReleaseError(
      `${tag}'s ${MANIFEST_NAME} does not match its ${SUMS_NAME}: the release was changed, refusing to trust it`,
    );
  }
  if (manifest && manifest.tag.toLowerCase() !== tag.toLowerCase()) {
    throw new ReleaseError(
      `the ${
        signed ? "signed " : ""
      }${MANIFEST_NAME} of ${tag} names ${manifest.tag}: an older release served under another tag; nothing was changed: ${command} ${manifest.tag} by its own tag, or check --server`,
    );
  }
  return manifest;
}

/** A release names files: never a path, which could reach outside the directory written. */
function plainNames(sums: Map<string, string>, tag: string): Map<string, string> {
  const bad = [...sums.keys()].find((name) => !ASSET_NAME.test(name));
  if (bad !== undefined) {
    throw new ReleaseError(
      `${SUMS_NAME} of ${tag} lists ${
        JSON.stringify(bad)
      }, which is not a plain file name: refusing to trust the release`,
    );
  }
  return sums;
}

/** manifest.json's assets of the chosen targets; a target it has no files for is refused. */
export function assetsOfTargets(
  manifest: Pick<Manifest, "assets">,
  targets: string[],
  system: string,
  tag: string,
): ManifestAsset[] {
  for (const target of targets) {
    if (!manifest.assets.some((a) => a.target === target && a.system === system)) {
      throw new ReleaseError(
        `${tag} has no ${target} files for ${system}; it has ${
          [...new Set(manifest.assets.map((a) => `${a.target} (${a.system})`))].join(", ")
        }`,
      );
    }
  }
  return manifest.assets.filter((a) => targets.includes(a.target) && a.system === system);
}

/** The assets of the chosen targets, each with the checksum SHA256SUMS gives it. */
export function chooseAssets(
  manifest: Pick<Manifest, "assets">,
  sums: Map<string, string>,
  targets: string[],
  system: string,
  tag: string,
): ManifestAsset[] {
  const wanted = assetsOfTargets(manifest, targets, system, tag);
  for (const asset of wanted) {
    if (sums.get(asset.name) !== asset.sha256) {
      throw new ReleaseError(
        `${asset.name} is not listed in ${tag}'s ${SUMS_NAME} as ${MANIFEST_NAME} says: the release is inconsistent, refusing to trust it`,
      );
    }
  }
  return wanted;
}
