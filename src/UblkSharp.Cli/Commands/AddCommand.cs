using System.CommandLine;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp add`: creates a device and serves it. Without --foreground the command starts a
/// detached daemon, waits until the device is live, prints its path and returns.
/// </summary>
internal static class AddCommand
{
    public static Command Create()
    {
        var target = new TargetOptions();
        var number = new Option<int>("--number", "-n") { Description = "Device id (default: the first free one)", DefaultValueFactory = _ => -1 };
        var queues = new Option<int>("--queues", "-q") { Description = "Hardware queues, one thread each", DefaultValueFactory = _ => 1 };
        var depth = new Option<int>("--depth", "-d") { Description = "Requests in flight per queue", DefaultValueFactory = _ => 128 };
        var maxIo = new Option<string?>("--max-io") { Description = "Largest request (default 512K)" };
        var foreground = new Option<bool>("--foreground") { Description = "Serve in this process until SIGTERM or SIGINT (for systemd)" };
        var recovery = new Option<string>("--recovery") { Description = "When the daemon dies: off (the device dies too), on (IO waits for 'recover'), reissue (and IO in flight is replayed), fail-io (6.13+)", DefaultValueFactory = _ => "off" };
        var supervise = new Option<bool>("--supervise") { Description = "Recover the device automatically when its daemon dies (needs --recovery on or reissue)" };
        var autoclear = new Option<bool>("--autoclear") { Description = "Delete the device once it has been mounted and its last mount is gone" };
        var startTimeout = new Option<int>("--start-timeout") { Description = "Seconds the device may take to start (the kernel reads its partition table through the target)", DefaultValueFactory = _ => 60 };
        var noPartitionScan = new Option<bool>("--no-partition-scan") { Description = "Do not read a partition table when the device starts (Linux 7.0+)" };
        var zeroCopy = new Option<string>("--zero-copy") { Description = "Zero copy (AUTO_BUF_REG, Linux 6.16+, or SUPPORT_ZERO_COPY, 6.15+; the loop and cow targets served on the ring, nbd): auto (where it can be had; the default), on (or fail), off, explicit (SUPPORT_ZERO_COPY's per-request registration, or fail)", DefaultValueFactory = _ => "auto" };
        var batch = new Option<string>("--batch") { Description = "Batched IO commands (BATCH_IO, Linux 7.0+): auto (where offered, without --recovery; the default), on (or fail; with --recovery, upgrade needs reissue), off", DefaultValueFactory = _ => "auto" };
        var readyFile = new Option<string?>("--ready-file") { Hidden = true };
        var metrics = new MetricsOptions();

        var command = new Command("add", "Create a ublk device and serve it")
        {
            number, queues, depth, maxIo, foreground, recovery, supervise, autoclear, startTimeout, noPartitionScan, zeroCopy, batch, readyFile,
        };
        metrics.AddTo(command);
        target.AddTo(command);
        target.AddClientTlsTo(command);
        command.SetAction(r =>
        {
            var recipe = target.Recipe(r);
            var kind = target.Kind(r);
            var maxIoText = r.GetValue(maxIo);
            var options = new DeviceOptions
            {
                DeviceId = r.GetValue(number),
                Queues = r.GetValue(queues),
                Depth = r.GetValue(depth),
                MaxIoBytes = maxIoText is null ? 512 * 1024 : (int)Math.Min(int.MaxValue, ByteSize.Parse(maxIoText)),
                Recovery = RecoveryModes.Parse(r.GetValue(recovery)!),
                StartTimeout = TimeSpan.FromSeconds(r.GetValue(startTimeout)),
                NoPartitionScan = r.GetValue(noPartitionScan),
                ZeroCopy = ZeroCopyModes.Parse(r.GetValue(zeroCopy)!),
                Batch = BatchModes.Parse(r.GetValue(batch)!),
            };
            options.Validate();
            if (r.GetValue(supervise) && options.Recovery is not (RecoveryMode.On or RecoveryMode.Reissue))
            {
                throw new ArgumentException("--supervise recovers the device after a crash, so it needs --recovery on or --recovery reissue");
            }
            var args = Program.Arguments;
            var supervised = r.GetValue(supervise);
            var metricsAddress = metrics.Checked(r, "the device's");
            if (r.GetValue(target.Create))
            {
                // The COW file or qcow2 image is made once, here; the daemon, a supervisor's restarts and recovery reopen it.
                if (kind is not ("cow" or "qcow2"))
                {
                    throw new ArgumentException("--create makes a COW file or a qcow2 image: it goes with -t cow or -t qcow2");
                }
                // Bad input first, then the driver, and only then a new file on disk.
                if (kind == "cow" && supervised && !r.GetValue(target.ReadOnly))
                {
                    throw SupervisionRefused(Targets.Cow.CowTarget.WritableRecoveryRefusal, kind);
                }
                if (kind == "cow" && recipe.TryGetValue("file", out var overlay) && recipe.TryGetValue("backing", out var backingFile))
                {
                    Targets.Cow.CowTarget.CheckCreate(overlay, backingFile);
                    Preflight.RequireDriver();
                }
                if (kind == "qcow2" && recipe.TryGetValue("file", out var newImage))
                {
                    if (File.Exists(newImage))
                    {
                        throw new ArgumentException($"{newImage} exists: --create makes a new image and never overwrites one");
                    }
                    Preflight.RequireDriver();
                }
                TargetFactory.Create(kind, new Dictionary<string, string>(recipe) { ["create"] = "on" }).Dispose();
                recipe.Remove("create");
                args = WithoutOptions(args, "--create");
            }
            if (supervised)
            {
                using var t = TargetFactory.Create(kind, recipe);
                if (!t.SurvivesRestart)
                {
                    throw SupervisionRefused(t.RecoveryRefusal, t.Kind);
                }
            }
            if (r.GetValue(foreground))
            {
                Preflight.RequireDriver();
                if (supervised)
                {
                    // The supervisor runs the same command, minus the options that made it a supervisor.
                    return Supervisor.Run(WithoutOptions(args, "--supervise", "--foreground", "--ready-file"), r.GetValue(readyFile));
                }
                return DaemonHost.Serve(kind, recipe, options, r.GetValue(autoclear), null, r.GetValue(readyFile), metrics: metricsAddress);
            }
            // Bad input is reported first, and before any daemon starts.
            using (var t = TargetFactory.Create(kind, recipe))
            {
                Preflight.RequireDriver();
                RequireOffered(options);
                if (options.ZeroCopy is ZeroCopyMode.On or ZeroCopyMode.Explicit)
                {
                    using var control = Ublk.ControlDevice.Open();
                    UblkDevice.ZeroCopyFlags(control, t, options.ZeroCopy, !Processes.IsRoot);
                }
            }
            var (_, path) = DaemonLauncher.Launch(args);
            Console.WriteLine(path);
            return 0;
        });
        return command;
    }

    // A cow overlay or an rbd image with librbd's default cache can be handed over (upgrade), but a crash loses its latest state.
    private static ArgumentException SupervisionRefused(string why, string kind) =>
        new($"--supervise recovers the device after its daemon crashes, and {why} (recovery on a {kind} device is for 'ublksharp upgrade' only)");

    // What the kernel must offer for these options, said before a daemon starts.
    private static void RequireOffered(DeviceOptions options)
    {
        if (!Processes.IsRoot && options.Recovery != RecoveryMode.Off)
        {
            throw new ArgumentException(UblkDevice.UnprivilegedRecoveryRefused);
        }
        if (!options.NoPartitionScan && options.Recovery != RecoveryMode.FailIo && options.Batch != BatchMode.On)
        {
            return;
        }
        using var control = Ublk.ControlDevice.Open();
        var offered = control.GetFeatures();
        if (options.NoPartitionScan && (offered & Ublk.UblkFeatures.NoAutoPartScan) == 0)
        {
            throw new NotSupportedException($"--no-partition-scan needs NO_AUTO_PART_SCAN (Linux 7.0+); this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer it");
        }
        if (options.Batch == BatchMode.On && UblkDevice.BatchRefusal(options) is { } why)
        {
            throw new NotSupportedException($"--batch on: {why}");
        }
        if (options.Batch == BatchMode.On && (offered & Ublk.UblkFeatures.BatchIo) == 0)
        {
            throw new NotSupportedException($"--batch on needs BATCH_IO (Linux 7.0+); this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer it");
        }
        if (options.Recovery == RecoveryMode.FailIo && (offered & Ublk.UblkFeatures.UserRecoveryFailIo) == 0)
        {
            throw new NotSupportedException($"--recovery fail-io needs USER_RECOVERY_FAIL_IO (Linux 6.13+); this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer it");
        }
    }

    private static string[] WithoutOptions(string[] args, params string[] drop)
    {
        var result = new List<string>();
        for (var i = 0; i < args.Length; i++)
        {
            if (drop.Contains(args[i]))
            {
                if (args[i] == "--ready-file")
                {
                    i++; // and its value
                }
                continue;
            }
            result.Add(args[i]);
        }
        return [.. result];
    }
}
