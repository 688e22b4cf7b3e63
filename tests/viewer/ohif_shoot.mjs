// Open one study in a served OHIF viewer with headless Chromium, load its SEG and SR, take
// screenshots and write what the viewer showed as JSON.
//
//   NODE_PATH=DIR_WITH_playwright-core node ohif_shoot.mjs VIEWER_URL STUDY_UID OUT_DIR
//
// Steps (each screenshot is OUT_DIR/NN-name.png):
//   01-series      the study browser: which series OHIF lists
//   02-seg         SEG opened (double-click its thumbnail, confirm), segmentation panel open
//   03-seg-<label> the first tumour segment clicked (the viewport jumps to it)
//   04-sr-<n>      SR opened; then each press of the SR viewport's "next" arrow
// OUT_DIR/report.json: series, segment labels, the viewport's slice per step, the SR
// measurements OHIF parsed (from its console), the SR annotations it could not place on an
// image ("undrawn"), console errors and a viewer crash, if any.

import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.cwd(), 'noop.js'));
const { chromium } = require('playwright-core');

const [viewerUrl, studyUid, outDir] = process.argv.slice(2);
if (!viewerUrl || !studyUid || !outDir) {
  console.error('usage: node ohif_shoot.mjs VIEWER_URL STUDY_UID OUT_DIR');
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const report = {
  series: [], segments: [], steps: [], srMeasurements: [], undrawn: [], errors: [],
  trackingOffered: false, measurementsPanel: [],
};

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  // WebGL without a GPU: SwiftShader.
  args: ['--no-sandbox', '--enable-unsafe-swiftshader', '--use-angle=swiftshader'],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
page.on('console', message => {
  const text = message.text();
  // OHIF reports a crash of its viewer route at debug level ("... Error Boundary ...").
  if (message.type() === 'error' || text.includes('Error Boundary')) report.errors.push(text);
  // cornerstone-dicom-sr logs every parsed measurement that it cannot make editable.
  const parsed = text.match(/^Measurement is not rehydratable (.*) \{.*labels: Array\((\d+)\), coords: Array\((\d+)\)/);
  if (parsed) {
    report.srMeasurements.push({ tracking: parsed[1], labels: +parsed[2], coords: +parsed[3] });
  }
  // An SR annotation the stack viewport cannot place on an image (OHIF 3.13 says so for
  // SCOORD3D, which names no image) is parsed but never drawn.
  if (text.includes('Unable to apply reference viewable')) report.undrawn.push(text.slice(0, 300));
});
page.on('pageerror', error => report.errors.push(`pageerror: ${error.message}`));

const slice = () => page.locator('[data-cy="viewport-overlay-bottom-right"]').first().innerText();
const thumbnail = modality =>
  page.locator('[data-cy="study-browser-thumbnail-no-image"]', {
    has: page.locator('[data-cy="series-modality-label"]', { hasText: modality }),
  });

async function shoot(name, note) {
  const file = path.join(outDir, `${name}.png`);
  await page.screenshot({ path: file });
  const step = { name, file, slice: await slice().catch(() => null), note };
  report.steps.push(step);
  console.log(JSON.stringify(step));
}

async function dismissIntroductions() {
  await page.getByText('Skip all').click({ timeout: 30000 }).catch(() => {});
  await page.getByText('Confirm and hide').click({ timeout: 3000 }).catch(() => {});
}

try {
  await page.goto(`${viewerUrl}/viewer?StudyInstanceUIDs=${studyUid}`, { waitUntil: 'load' });
  await page.locator('[data-cy="viewport-overlay-bottom-right"]').first().waitFor({ timeout: 60000 });
  await dismissIntroductions();
  await page.waitForTimeout(1500);
  report.series = await page
    .locator('[data-cy="series-modality-label"]')
    .allInnerTexts()
    .then(labels => labels.map(label => label.trim()));
  await shoot('01-series', 'study browser');

  if (await thumbnail('SEG').count()) {
    await thumbnail('SEG').first().dblclick();
    await page.getByRole('button', { name: 'Yes' }).click({ timeout: 30000 }).catch(() => {});
    await page.waitForTimeout(8000);
    await page.locator('[data-cy="panelSegmentation-btn"]').click().catch(() => {});
    await page.waitForTimeout(2000);
    const body = await page.locator('body').innerText();
    const panel = body.slice(body.lastIndexOf('Segmentations'));
    // The panel lists "N" and the segment's label on the next line, per segment.
    report.segments = [...panel.matchAll(/^\d+\n(.+)$/gm)].map(match => match[1]);
    await shoot('02-seg', 'SEG loaded, segmentation panel');
    const tumour = report.segments.find(label => /tumou?r/i.test(label));
    if (tumour) {
      await page.getByText(tumour, { exact: true }).first().click();
      await page.waitForTimeout(3000);
      await shoot(`03-seg-${tumour.replace(/\W+/g, '-').toLowerCase()}`, `segment ${tumour} clicked`);
    }
  }

  if (await thumbnail('SR').count()) {
    await thumbnail('SR').first().dblclick();
    await page.waitForTimeout(8000);
    await shoot('04-sr-0', 'SR opened');
    // OHIF's error boundary replaces the viewport (and logs the error at debug level only).
    if ((await page.locator('body').innerText()).includes('Something went wrong')) {
      report.errors.push('viewer: "Something went wrong" after opening the SR');
    }
    for (let i = 1; i <= Math.max(report.srMeasurements.length - 1, 0); i++) {
      await page.locator('[data-cy="viewport-action-arrows-right"]').first().click();
      await page.waitForTimeout(2500);
      await shoot(`04-sr-${i}`, 'SR: next measurement');
    }
    // A rehydratable SR makes OHIF ask whether to track its measurements; yes loads them into
    // the Measurements panel (an SR it cannot load shows a "!" badge and never asks).
    const prompt = page.getByText('Do you want to continue tracking measurements', { exact: false });
    report.trackingOffered = (await prompt.count()) > 0;
    if (report.trackingOffered) {
      await page.getByRole('button', { name: 'Yes', exact: true }).first().click();
      await page.waitForTimeout(5000);
      await page.locator('[data-cy="trackedMeasurements-btn"]').first().click().catch(() => {});
      await page.waitForTimeout(3000);
      await shoot('05-measurements', 'SR measurements tracked, Measurements panel');
      report.measurementsPanel = (await page.locator('body').innerText()).split('\n');
    }
  }
} catch (error) {
  report.errors.push(`script: ${error.message}`);
  await page.screenshot({ path: path.join(outDir, '99-failure.png') }).catch(() => {});
} finally {
  writeFileSync(path.join(outDir, 'report.json'), JSON.stringify(report, null, 2));
  await browser.close();
}
