using System.CommandLine;
using System.Globalization;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp recover -n ID`: a new daemon takes over a device whose daemon died. The target is
/// rebuilt from the recipe the first daemon recorded in /run/ublksharp/ID.json.
/// </summary>
internal static class RecoverCommand
{
    public static Command Create()
    {
        var number = new Option<int>("--number", "-n") { Description = "The device id", Required = true };
        var foreground = new Option<bool>("--foreground") { Description = "Serve in this process until SIGTERM or SIGINT" };
        var readyFile = new Option<string?>("--ready-file") { Hidden = true };
        // A supervisor's warm spare: started ahead of time, it recovers the device when a line arrives on stdin.
        var standby = new Option<bool>("--standby") { Hidden = true };
        // Written once a spare is warm (`upgrade` waits for it before it asks the old daemon to let go).
        var warmFile = new Option<string?>("--warm-file") { Hidden = true };
        // With --standby and --warm-file: a new supervisor for an upgrade, whose first daemon is that standby.
        var supervise = new Option<bool>("--supervise") { Hidden = true };
        var command = new Command("recover", "Restart the daemon of a device whose daemon died (created with --recovery on|reissue)") { number, foreground, readyFile, standby, warmFile, supervise };
        command.SetAction(r =>
        {
            var n = r.GetValue(number);
            if (n < 0)
            {
                throw new ArgumentException($"bad device id {n}");
            }
            var id = (uint)n;
            Preflight.RequireDriver();
            var record = DeviceRecord.Load(id);
            // Before anything opens them (a daemon, a warm spare, an upgrade's new daemon).
            if (record?.FilesProblem() is string changed)
            {
                throw new RecoveryRefusedException(changed);
            }
            if (!r.GetValue(foreground))
            {
                CheckRecoverable(id, record);
                var (_, path) = DaemonLauncher.Launch(["recover", "-n", id.ToString(CultureInfo.InvariantCulture)]);
                Console.WriteLine(path);
                return 0;
            }
            if (record is null)
            {
                throw new ArgumentException($"no record of device {id} in {DeviceRecord.Directory}: recover rebuilds the target from the record its first daemon wrote");
            }
            if (r.GetValue(supervise))
            {
                if (!r.GetValue(standby) || r.GetValue(warmFile) is not string warmPath)
                {
                    throw new ArgumentException("--supervise goes with --standby and --warm-file (an upgrade's new supervisor)");
                }
                return Supervisor.RunTakeover(id, warmPath, r.GetValue(readyFile));
            }
            var options = record.RecoveryOptions();
            TakeoverLock? takeover = null;
            if (r.GetValue(standby))
            {
                // Everything a cold start would load is loaded now; the takeover waits for the word.
                using (var control = ControlDevice.Open())
                {
                    control.GetDeviceInfo(id);
                }
                try
                {
                    TargetFactory.Create(record.Target, record.Recipe).Dispose();
                }
                catch (Exception e) when (e is TargetLockedException || e.InnerException is TargetLockedException)
                {
                    // The serving daemon holds the target's files or image locked (a cow overlay, an
                    // rbd image): they are opened after the takeover, when it has let go of them.
                    CliLog.Warning($"standby for device {id}: {e.Message}; opening it at the takeover");
                }
                if (r.GetValue(warmFile) is string warm)
                {
                    // An upgrade's new daemon: the takeover is this one's from before the old daemon
                    // is asked to let go, so a second upgrade or a recover fails before anything changes.
                    takeover = TakeoverLock.Take(id, "upgrade");
                    Runtime.StateDirectory.WriteAtomically(warm, "warm");
                }
                if (Console.In.ReadLine() != "go")
                {
                    return 0; // the supervisor went away: nothing to take over
                }
                // Read again: the daemon that let go has marked its record released since.
                record = DeviceRecord.Load(id) ?? record;
                // A warm spare may have waited for hours: its files are checked again before it opens them.
                if (record.FilesProblem() is string replaced)
                {
                    throw new RecoveryRefusedException(replaced);
                }
            }
            using (takeover)
            {
                // A target that holds a lock of its backing (rbd) takes it over from the previous
                // daemon: waits for one that handed over, breaks a dead one's. Never recorded.
                var recipe = new Dictionary<string, string>(record.Recipe) { [TargetFactory.TakeoverKey] = record.Released ? "wait" : "break" };
                return DaemonHost.Serve(record.Target, recipe, options, record.Autoclear, id, r.GetValue(readyFile), takeover, record.Released, record.Metrics);
            }
        });
        return command;
    }

    // The library's refusals, made before a daemon is started so they read plainly.
    private static void CheckRecoverable(uint id, DeviceRecord? record)
    {
        using (var control = ControlDevice.Open())
        {
            Recoverability.Check(control, id);
        }
        // The daemon takes the lock itself (UblkDevice.Recover); this only says so before starting one.
        TakeoverLock.RefuseIfHeld(id);
        if (record is null)
        {
            throw new ArgumentException($"no record of device {id} in {DeviceRecord.Directory}: recover rebuilds the target from the record its first daemon wrote");
        }
        if (record is { CrashSafe: false, Released: false })
        {
            throw new RecoveryRefusedException(UblkDevice.CrashLostStateMessage(id, record.Target));
        }
    }
}
