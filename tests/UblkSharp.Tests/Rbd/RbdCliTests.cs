using System.Diagnostics;
using System.Security.Cryptography;
using UblkSharp.Interop;
using UblkSharp.Tests.Nbd;

namespace UblkSharp.Tests.Rbd;

/// <summary>
/// `ublksharp serve -t rbd`: an RBD image exported over NBD to Debian's real clients, and the
/// errors a person gets at the command line (a missing pool or image, an unreachable cluster, a
/// second writer) as one clear line and a non-zero exit.
/// </summary>
[Collection(nameof(CephCollection))]
public class RbdCliTests(CephCluster cluster)
{
    private const int MiB = 1 << 20;

    [Fact]
    public void Nbdcopy_round_trips_an_image_through_the_export()
    {
        var name = cluster.CreateImage(64 * MiB);
        using var serve = Serve($"--pool rbd --image {name}");
        var source = Path.Combine(serve.Directory, "in.img");
        var data = new byte[64 * MiB];
        new Random(5).NextBytes(data.AsSpan(0, 40 * MiB)); // the tail stays zero (sparse)
        File.WriteAllBytes(source, data);
        Tools.OkWithin(TimeSpan.FromMinutes(2), "nbdcopy", "--flush", source, serve.Uri);
        var copy = Path.Combine(serve.Directory, "out.img");
        Tools.OkWithin(TimeSpan.FromMinutes(2), "nbdcopy", serve.Uri, copy);
        Assert.Equal(SHA256.HashData(data), SHA256.HashData(File.ReadAllBytes(copy)));
        serve.Stop();
        // The data is in the cluster: another client exports the same bytes.
        var exported = Path.Combine(serve.Directory, "exported.img");
        cluster.RbdCli("export", $"rbd/{name}", exported);
        Assert.Equal(SHA256.HashData(data), SHA256.HashData(File.ReadAllBytes(exported)));
    }

    [Fact]
    public void Fio_nbd_engine_verifies_crc32c_through_the_export()
    {
        var name = cluster.CreateImage(64 * MiB);
        using var serve = Serve($"--pool rbd --image {name} --workers 32");
        var output = Tools.OkWithin(TimeSpan.FromMinutes(4), "fio", "--name=verify", "--ioengine=nbd", $"--uri={serve.Uri}",
            "--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--iodepth=16", "--numjobs=2", "--size=8M", "--offset_increment=16M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting");
        Assert.Contains("verify", output, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("verify: bad", output, StringComparison.OrdinalIgnoreCase);
        Assert.Contains("err= 0", output, StringComparison.Ordinal);
    }

    [Fact]
    public void A_missing_pool_or_image_or_snapshot_is_one_clear_line()
    {
        var name = cluster.CreateImage(8 * MiB);
        AssertFails($"--pool nopool --image {name}", "the Ceph cluster has no pool 'nopool'");
        AssertFails("--pool rbd --image nosuchimage", "pool 'rbd' has no image 'nosuchimage'");
        AssertFails($"--pool rbd --image {name} --snap nosnap", $"no image 'rbd/{name}' with a snapshot 'nosnap'");
        AssertFails($"--image {name}", "the rbd target needs --pool POOL", conf: false);
        AssertFails($"--pool rbd --image {name} --conf /nonexistent/ceph.conf", "/nonexistent/ceph.conf: no such Ceph configuration file", conf: false);
    }

    [Fact]
    public void A_key_the_cluster_refuses_is_one_clear_line_naming_the_client()
    {
        // A well-formed cephx key that is not client.ublk's (the cluster runs with cephx on).
        var wrong = Path.Combine(cluster.Directory, "wrong.key");
        File.WriteAllText(wrong, "AQCHVhdryPJ3ExAApVIAKWA4JNI0jGXqRytYOA==\n");
        var stderr = AssertFails($"--pool rbd --image x --id ublk --keyfile {wrong} --timeout 10", "cephx authentication failed");
        Assert.Contains("client.ublk", stderr, StringComparison.Ordinal);
        Assert.Contains(wrong, stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void An_unreachable_cluster_fails_within_the_timeout()
    {
        // The monitor address of a port nobody listens on (the test cluster's own, with the port changed).
        var conf = Path.Combine(cluster.Directory, "unreachable.conf");
        File.WriteAllText(conf, System.Text.RegularExpressions.Regex.Replace(File.ReadAllText(cluster.Conf), @"mon_host = .*", "mon_host = v2:127.0.0.1:9"));
        var sw = Stopwatch.StartNew();
        var stderr = AssertFails($"--pool rbd --image x --conf {conf} --timeout 3", "cannot connect to the Ceph cluster", conf: false);
        Assert.Contains("no monitor answered within 3 s", stderr, StringComparison.Ordinal);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(90), $"took {sw.Elapsed.TotalSeconds:F0} s"); // a dotnet start on a loaded machine plus 3 s; librados alone would wait 300 s
    }

    [Fact]
    public void A_second_writer_is_refused_while_a_reader_is_not()
    {
        var name = cluster.CreateImage(8 * MiB);
        using var first = Serve($"--pool rbd --image {name}");
        Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", first.Uri);
        var stderr = AssertFails($"--pool rbd --image {name}", $"the image rbd/{name} is in use: another client holds its exclusive lock");
        Assert.Contains("--read-only", stderr, StringComparison.Ordinal);
        // A read-only export of the same image serves alongside the writer.
        using var reader = Serve($"--pool rbd --image {name} --read-only");
        var output = Tools.Ok("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", reader.Uri);
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
        // The first writer still holds the image and writes.
        Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 4k", "-c", "read -P 0x6b 0 4k", first.Uri);
    }

    private string AssertFails(string options, string message, bool conf = true)
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-rbd-");
        try
        {
            var (code, stdout, stderr) = CephCluster.Run("dotnet",
                [CephCluster.CliDll, "serve", "-t", "rbd", .. Split(options), .. (conf ? new[] { "--conf", cluster.Conf } : []), "-l", $"unix://{dir.FullName}/s.sock"],
                TimeSpan.FromSeconds(90));
            Assert.True(code == 1, $"exit {code}\nstdout: {stdout}\nstderr: {stderr}");
            var line = Assert.Single(stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), l => l.StartsWith("ublksharp:", StringComparison.Ordinal));
            Assert.Contains(message, line, StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal); // no stack trace
            return stderr;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    private static string[] Split(string s) => s.Split(' ', StringSplitOptions.RemoveEmptyEntries);

    private ServeProcess Serve(string options) => new(cluster, options);

    /// <summary>A `ublksharp serve -t rbd` process on a Unix socket in its own temporary directory.</summary>
    private sealed class ServeProcess : IDisposable
    {
        private readonly Process _process;
        private bool _stopped;

        public ServeProcess(CephCluster cluster, string options)
        {
            Directory = System.IO.Directory.CreateTempSubdirectory("ublksharp-rbd-").FullName;
            var socket = Path.Combine(Directory, "nbd.sock");
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in (string[])[CephCluster.CliDll, "serve", "-t", "rbd", .. Split(options), "--conf", cluster.Conf, "-l", $"unix://{socket}"])
            {
                psi.ArgumentList.Add(a);
            }
            _process = Process.Start(psi)!;
            var first = _process.StandardOutput.ReadLineAsync(TestContext.Current.CancellationToken).AsTask();
            if (!first.Wait(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken) || first.Result != $"unix://{socket}")
            {
                Stop();
                Assert.Fail($"serve did not start: {first.Status} {(first.IsCompletedSuccessfully ? first.Result : "")}\n{_process.StandardError.ReadToEnd()}");
            }
            Uri = $"nbd+unix:///?socket={socket}";
        }

        public string Directory { get; }

        public string Uri { get; }

        public void Stop()
        {
            if (_stopped)
            {
                return;
            }
            _stopped = true;
            if (!_process.HasExited)
            {
                Processes.Signal(_process.Id, 15);
                if (!_process.WaitForExit(30_000))
                {
                    _process.Kill();
                    Assert.Fail("serve did not stop within 30 s of SIGTERM");
                }
            }
        }

        public void Dispose()
        {
            Stop();
            _process.Dispose();
            System.IO.Directory.Delete(Directory, recursive: true);
        }
    }
}
