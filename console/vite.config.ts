import { defineConfig } from "vite";
import preact from "@preact/preset-vite";

// Served by the binary under /console/ (the index also at /); no external network at run time.
export default defineConfig({
  base: "/console/",
  plugins: [preact()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 200,
  },
});
