// Opens the status page, clicks one operator button and waits for the page to show the new
// state; prints the final row's text. Usage: node click.mjs URL ADDRESS BUTTON EXPECTED_BADGE
// Driven by tests/status_page.rs; uses Debian's /usr/bin/chromium (no browser download).
import { chromium } from "playwright-core";

const [url, address, button, expected] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(url);
  const row = page.locator("tr.rs", { hasText: address });
  await row.getByRole("button", { name: button }).click({ timeout: 10000 });
  await row.locator("." + expected.toLowerCase()).waitFor({ timeout: 10000 });
  console.log((await row.innerText()).replace(/\s+/g, " "));
  console.log("message: " + (await page.locator("#opmsg").innerText()));
} finally {
  await browser.close();
}
