using System.Diagnostics;
using System.IO.Compression;
using System.Xml.Linq;
using UblkSharp.Tests.Nbd;

namespace UblkSharp.Tests.Cli;

/// <summary>
/// The NuGet packages as a user gets them (tools/install-packages): the library's package carries
/// its docs, README, license and symbols; the tool installs from a local feed into a clean HOME and
/// runs as `ublksharp`; and a program built from the library package alone serves a target (over
/// NBD here; as a ublk device in the VM's PackagedToolTests).
/// </summary>
public sealed class PackageTests(PackageTests.Installed installed) : IClassFixture<PackageTests.Installed>
{
    /// <summary>
    /// The output of tools/install-packages: the one ./test.sh made (UBLKSHARP_PACKAGES, so CI
    /// packs once), or else a fresh one of this checkout.
    /// </summary>
    public sealed class Installed : IDisposable
    {
        private readonly string? _temp;

        public Installed()
        {
            var given = Environment.GetEnvironmentVariable("UBLKSHARP_PACKAGES");
            if (!string.IsNullOrEmpty(given))
            {
                Dir = given;
            }
            else
            {
                _temp = Directory.CreateTempSubdirectory("ublksharp-packages-").FullName;
                Dir = _temp;
                var script = Path.Combine(CliProcess.RepoRoot(), "tools", "install-packages");
                var (code, stdout, stderr) = Tools.Run(script, [Dir], TimeSpan.FromMinutes(10));
                Assert.True(code == 0, $"tools/install-packages exited {code}\n{stdout}\n{stderr}");
            }
            Version = File.ReadAllText(Path.Combine(Dir, "version")).Trim();
        }

        public string Dir { get; }

        public string Version { get; }

        public string Feed => Path.Combine(Dir, "feed");

        public string Tool => Path.Combine(Dir, "home", ".dotnet", "tools", "ublksharp");

        public void Dispose()
        {
            if (_temp is not null)
            {
                Directory.Delete(_temp, recursive: true);
            }
        }
    }

    private static XElement Metadata(string nupkg)
    {
        using var zip = ZipFile.OpenRead(nupkg);
        var nuspec = zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal));
        using var s = nuspec.Open();
        var doc = XDocument.Load(s);
        return doc.Root!.Elements().Single(e => e.Name.LocalName == "metadata");
    }

    private static string? Meta(XElement metadata, string name) =>
        metadata.Elements().SingleOrDefault(e => e.Name.LocalName == name)?.Value;

    private static string[] Entries(string nupkg)
    {
        using var zip = ZipFile.OpenRead(nupkg);
        return [.. zip.Entries.Select(e => e.FullName)];
    }

    [Fact]
    public void TheLibraryPackageCarriesDocsReadmeLicenseRepositoryAndSymbols()
    {
        var nupkg = Path.Combine(installed.Feed, $"UblkSharp.{installed.Version}.nupkg");
        var entries = Entries(nupkg);
        Assert.Contains("lib/net10.0/UblkSharp.dll", entries);
        Assert.Contains("lib/net10.0/UblkSharp.xml", entries); // the XML docs
        Assert.Contains("README.md", entries);
        var m = Metadata(nupkg);
        Assert.Equal("UblkSharp", Meta(m, "id"));
        Assert.Equal("README.md", Meta(m, "readme"));
        Assert.Equal("MIT", Meta(m, "license"));
        Assert.False(string.IsNullOrWhiteSpace(Meta(m, "description")));
        var repository = m.Elements().Single(e => e.Name.LocalName == "repository");
        Assert.Equal("git", repository.Attribute("type")?.Value);
        Assert.Matches("^[0-9a-f]{40}$", repository.Attribute("commit")?.Value ?? "");
        // Symbols: a .snupkg beside it with the library's portable PDB.
        Assert.Contains("lib/net10.0/UblkSharp.pdb", Entries(Path.Combine(installed.Feed, $"UblkSharp.{installed.Version}.snupkg")));
    }

    [Fact]
    public void TheToolPackageIsReadyToRunPerPlatformAndItsCommandIsUblksharp()
    {
        // The pointer package names the command; each platform's package holds the precompiled build.
        var pointer = Path.Combine(installed.Feed, $"UblkSharp.Cli.{installed.Version}.nupkg");
        var types = Metadata(pointer).Descendants().Where(e => e.Name.LocalName == "packageType").Select(e => e.Attribute("name")?.Value);
        Assert.Contains("DotnetTool", types);
        Assert.Contains("tools/any/any/DotnetToolSettings.xml", Entries(pointer));
        var platform = Path.Combine(installed.Feed, $"UblkSharp.Cli.linux-x64.{installed.Version}.nupkg");
        using var zip = ZipFile.OpenRead(platform);
        var settings = zip.Entries.Single(e => e.FullName.EndsWith("DotnetToolSettings.xml", StringComparison.Ordinal));
        using (var s = settings.Open())
        {
            var command = XDocument.Load(s).Descendants("Command").Single();
            Assert.Equal("ublksharp", command.Attribute("Name")?.Value);
        }
        var dll = zip.Entries.Single(e => e.Name == "UblkSharp.Cli.dll");
        using var ms = new MemoryStream();
        using (var d = dll.Open())
        {
            d.CopyTo(ms);
        }
        ms.Position = 0;
        using var pe = new System.Reflection.PortableExecutable.PEReader(ms);
        // ReadyToRun images carry a managed native header (the R2R header); IL-only ones do not.
        Assert.True(pe.PEHeaders.CorHeader!.ManagedNativeHeaderDirectory.Size > 0, "UblkSharp.Cli.dll in the linux-x64 tool package is not ReadyToRun");
    }

    [Fact]
    public async Task TheInstalledToolRunsAsUblksharp()
    {
        Assert.True(File.Exists(installed.Tool), $"{installed.Tool} is missing: the tool was not installed");
        var (code, stdout, stderr) = await CliProcess.Run(installed.Tool, "--version");
        Assert.True(code == 0, stderr);
        Assert.StartsWith(installed.Version, stdout.Trim(), StringComparison.Ordinal);
        (code, stdout, _) = await CliProcess.Run(installed.Tool, "--help");
        Assert.Equal(0, code);
        Assert.Contains("ublksharp [command] [options]", stdout, StringComparison.Ordinal);
        // A real command end to end: a COW overlay made and described by the installed tool.
        var dir = Directory.CreateTempSubdirectory("ublksharp-tool-").FullName;
        try
        {
            var basePath = Path.Combine(dir, "base.img");
            await File.WriteAllBytesAsync(basePath, new byte[1 << 20], TestContext.Current.CancellationToken);
            var overlay = Path.Combine(dir, "o.cow");
            (code, _, stderr) = await CliProcess.Run(installed.Tool, $"cow create {overlay} --backing {basePath}");
            Assert.True(code == 0, stderr);
            (code, stdout, stderr) = await CliProcess.Run(installed.Tool, $"cow info {overlay}");
            Assert.True(code == 0, stderr);
            Assert.Matches(@"backing size\s+1048576\n", stdout);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task AProgramBuiltFromTheLibraryPackageServesItsOwnTarget()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-consumer-").FullName;
        var socket = Path.Combine(dir, "disk.sock");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { Path.Combine(installed.Dir, "consumer", "PackageConsumer.dll"), "nbd", $"unix://{socket}" })
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        try
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
            cts.CancelAfter(TimeSpan.FromSeconds(60)); // the start, JIT-compiled on a loaded machine
            var line = await p.StandardOutput.ReadLineAsync(cts.Token);
            Assert.True(line == "listening", $"the consumer said '{line}' rather than 'listening'");
            // Its own target (a 64 MiB RAM disk) written and read back by a real NBD client.
            var output = Tools.Nbdsh($"nbd+unix:///?socket={socket}", """
                size = h.get_size()
                data = bytes(range(256)) * 16
                h.pwrite(data, 12345 * 512)
                back = h.pread(len(data), 12345 * 512)
                print(size, back == data, h.pread(512, 0) == bytes(512))
                """);
            Assert.Equal($"{64 << 20} True True", output.Trim());
        }
        finally
        {
            p.StandardInput.Close(); // it serves until stdin closes
            if (!p.WaitForExit(TimeSpan.FromSeconds(30))) // xunit1031: a bounded wait in cleanup
            {
                p.Kill(entireProcessTree: true);
                Assert.Fail("the consumer did not end within 30 s of its stdin closing");
            }
            Directory.Delete(dir, recursive: true);
        }
        Assert.Equal(0, p.ExitCode);
    }
}
